"""python -m bench.accuracy: the accuracy benchmark's command line (see --help)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from bench.accuracy import ruler
from bench.accuracy.results import folder_lock
from bench.accuracy.runner import SUITES, RunConfig, RunError, Runner

_TASK_LIST = textwrap.fill(", ".join(ruler.TASKS), 90, initial_indent=" " * 12, subsequent_indent=" " * 12)
EPILOG = f"""\
tasks (comma-separated; groups expand):
  ruler     RULER's 13 synthetic tasks, regenerated offline with the model's tokenizer:
{_TASK_LIST}
            scored with RULER's string_match_all (niah, vt, cwe, fwe) / string_match_part (qa);
            qa_1 / qa_2 need a length >= 2048
  needle    needle in a haystack over Paul Graham essays, --samples depths evenly over 0..100 %,
            scored by ROUGE-1 F x100 (string match on the key phrases recorded too)
  passkey   passkey retrieval, a seeded 5-digit key at a seeded depth; string_match_all
  fidelity  teacher-forced KL(full || policy) and top-1 agreement over --positions decode steps
            after a (length - positions - 1)-token prefix of essay text; score = top-1 agreement %
  all       everything above

Every row (policy, ratio, task, length, sample) is one JSON line in OUT/results.jsonl, with the
git revision of the code that ran it; a rerun skips rows already there. One runner per OUT: a
second one on the same folder stops with an error naming the first one's pid. Generated RULER
samples are kept in OUT/samples/. After the run the report (OUT/report.md and plots) is rebuilt;
rebuild it alone with
  python -m bench.accuracy.report OUT

example:
  python -m bench.accuracy --policies full,hetero,snapkv --tasks ruler,needle,passkey,fidelity \\
      --lengths 4096,8192 --samples 5 --ratio 0.5 --out runs/acc
"""


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.accuracy", description="Long-context accuracy of KV-cache policies.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--policies", type=_names, default=["full"],
                   help="cache policies, comma-separated: NAME[:RATIO][:OPTION=VALUE...] with registry names (full, "
                   "hetero, hetero_plus, hetero_fit, duo, snapkv, streaming, h2o, pyramidkv, retrieval, interval), e.g. "
                   "hetero:0.4,hetero:0.5:threshold=1 (refresh at every check); default full")
    p.add_argument("--tasks", default="ruler", help=f"tasks or groups ({', '.join(SUITES)}, all); default ruler")
    p.add_argument("--lengths", type=_ints, default=[4096],
                   help="total context lengths in tokens (prompt + generation budget); default 4096")
    p.add_argument("--samples", type=int, default=5, help="samples per task and length (needle: depths); default 5")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="device prompt-KV budget of compressing policies, fraction of full; default 0.5")
    p.add_argument("--out", type=Path, required=True, help="run folder (results.jsonl, samples/, report)")
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct, fetched on first use), a converted folder, "
                   "an HF folder or a .gguf")
    p.add_argument("--dtype", default=None, help="weights dtype (float32, bfloat16); default: the model's")
    p.add_argument("--seed", type=int, default=42, help="sample seed (RULER's default 42); default 42")
    p.add_argument("--template", choices=ruler.TEMPLATES, default="chat",
                   help="chat: wrap prompts in the model's chat template (instruct models); base: plain text")
    p.add_argument("--positions", type=int, default=256, help="fidelity: compared decode positions; default 256")
    p.add_argument("--no-report", action="store_true", help="do not rebuild the report after the run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    rc = RunConfig(policies=args.policies, tasks=args.tasks, lengths=args.lengths, samples=args.samples,
                   out=args.out, ratio=args.ratio, model=args.model, seed=args.seed, template=args.template,
                   positions=args.positions, dtype=args.dtype, progress=not args.quiet)
    try:
        with folder_lock(args.out):  # held through the report too
            counts = Runner(rc).run()
            too_long = f", {counts['too_long']} skipped (prompt too long)" if counts.get("too_long") else ""
            print(f"{counts['run']} rows run, {counts['skipped']} already done{too_long} -> "
                  f"{args.out / 'results.jsonl'}")
            if not args.no_report:
                from bench.accuracy.report import write_report

                print(f"report: {write_report(args.out)}")
    except (RunError, ruler.RulerError, ValueError) as e:  # FolderBusy and DuplicateRowError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
