"""Arenas in the paper's regime: QAT from a pretrained model, several seeds (docs/experiments.md).

Stages, each resumable (a finished run is skipped, an interrupted one resumes from its last checkpoint):

1. ``pretrain``: a small full-precision Llama trained from scratch on the packaged corpora;
2. ``sweep``: the Sherry arm without Arenas (seed 0) at each ``--lrs`` constant learning rate; the rate
   with the lowest final held-out loss is chosen (``OUT/chosen_lr.json``) for every arm;
3. ``arms``: from the pretrained model, Sherry without Arenas, Sherry + Arenas at each ``--lambda-max``,
   and dense ternary, each with every ``--seeds`` seed (the seed orders the data), equal token budgets,
   constant learning rate, weight decay 0, with ``sherry train --diagnostics`` (gradient effective rank
   and pattern flips) at every evaluation; ``--control`` adds the same arms from scratch;
4. ``report``: held-out perplexity per run, mean ± sd per arm, eval loss and diagnostics over training,
   the verdicts, a plot (``OUT/arenas_ablation.png``) and ``OUT/results.json``.

Usage:
    python models/recipes/arenas_ablation.py all --out runs/arenas --jobs 2      # every stage, unattended
    python models/recipes/arenas_ablation.py report --out runs/arenas            # the tables again

An effect is called only when two arms' mean held-out perplexities differ by more than twice the
larger of their standard deviations over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

LOG_HISTORY = "log_history.json"  # sherry_export.train.LOG_HISTORY_FILE (not imported: torch-free here)


@dataclass(frozen=True)
class Run:
    """One ``sherry train`` invocation: its folder and the flags on top of the shared ones."""

    folder: Path
    flags: tuple[str, ...]

    @property
    def done(self) -> bool:
        return (self.folder / LOG_HISTORY).is_file() and (self.folder / "config.json").is_file()

    def command(self, shared: list[str]) -> list[str]:
        resume = ["--resume"] if any(self.folder.glob("checkpoint-*")) else []
        return [sys.executable, "-m", "sherry_export.cli", "train", *shared, *self.flags, *resume,
                "--output", str(self.folder)]  # fmt: skip


def arm_flags(args: argparse.Namespace) -> dict[str, list[str]]:
    """The QAT arms: Sherry with and without Arenas (one arm per peak λ) and dense ternary."""
    arms = {"sherry": ["--quant", "sherry", "--no-arenas"]}
    for lam in args.lambda_max:
        arms[f"sherry+arenas λ{lam:g}"] = ["--quant", "sherry", "--arenas", "--lambda-max", f"{lam:g}"]
    arms["dense ternary"] = ["--quant", "ternary"]
    return arms


def folder_name(arm: str) -> str:
    return arm.replace(" ", "-").replace("+", "-").replace("λ", "lmax")


def shared_flags(args: argparse.Namespace, steps: int) -> list[str]:
    """Flags every run shares: data, batch shape, threads, evaluation and checkpoint cadence."""
    every = max(1, steps // args.evals)
    flags = ["--vocab", str(args.vocab), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
             "--steps", str(steps), "--eval-every", str(every), "--eval-batches", str(args.eval_batches),
             "--save-every", str(every), "--save-limit", "1", "--log-every", str(max(1, every // 4)),
             "--weight-decay", "0", "--threads", str(args.threads), "--data", args.data]  # fmt: skip
    if args.group_size:
        flags += ["--group-size", str(args.group_size)]
    return flags + (["--cache", str(args.cache)] if args.cache else [])


def scratch_flags(args: argparse.Namespace) -> list[str]:
    return ["--init", "scratch", "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads)]


def execute(runs: list[Run], shared: list[str], jobs: int) -> None:
    """Run what is not done yet, ``jobs`` at a time; each run logs to ``<folder>.log``. Fails on the first error."""
    todo = [run for run in runs if not run.done]
    for run in runs:
        if run.done:
            print(f"done already: {run.folder}")

    def one(run: Run) -> None:
        run.folder.parent.mkdir(parents=True, exist_ok=True)
        print(f"training {run.folder} ...", flush=True)
        with open(f"{run.folder}.log", "a") as log:
            result = subprocess.run(run.command(shared), stdout=log, stderr=subprocess.STDOUT, check=False)
        if result.returncode:
            raise RuntimeError(f"{run.folder} failed (exit {result.returncode}); see {run.folder}.log")
        print(f"finished {run.folder}", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, run) for run in todo]:
            future.result()


def pretrain(args: argparse.Namespace) -> Path:
    run = Run(args.out / "pretrain", (*scratch_flags(args), "--quant", "none", "--seed", "0", "--lr", "1e-3",
                                      "--lr-schedule", "cosine", "--lr-warmup-ratio", "0.05"))  # fmt: skip
    execute([run], shared_flags(args, args.pretrain_steps), 1)
    return run.folder


def final_eval_loss(folder: Path) -> float:
    history = json.loads((folder / LOG_HISTORY).read_text())
    losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    if not losses:
        raise ValueError(f"{folder} logged no evaluation; train with --eval-every")
    return losses[-1]


def qat_flags(init: str, lr: float, seed: int) -> list[str]:
    return ["--init", init, "--lr", f"{lr:g}", "--lr-schedule", "constant", "--lr-warmup-ratio", "0",
            "--seed", str(seed), "--diagnostics"]  # fmt: skip


def sweep(args: argparse.Namespace, pretrained: Path) -> float:
    """The constant learning rate for every arm: the best final held-out loss of the no-Arenas arm, seed 0."""
    chosen_file = args.out / "chosen_lr.json"
    runs = {lr: Run(args.out / "sweep" / f"lr{lr:g}", (*qat_flags(str(pretrained), lr, 0),
                                                       *arm_flags(args)["sherry"])) for lr in args.lrs}  # fmt: skip
    execute(list(runs.values()), shared_flags(args, args.steps), args.jobs)
    losses = {lr: final_eval_loss(run.folder) for lr, run in runs.items()}
    lr = min(losses, key=losses.get)
    chosen_file.write_text(json.dumps({"lr": lr, "eval_loss": {f"{k:g}": v for k, v in losses.items()}}, indent=1))
    print(f"learning rate sweep (final eval loss): {losses}; chosen {lr:g}")
    return lr


def arm_runs(args: argparse.Namespace, regime: str, init: str, lr: float) -> dict[str, list[Run]]:
    """Every arm × seed of one regime (``pretrained`` or ``scratch``); the sweep's run is reused for its seed."""
    runs = {}
    for arm, flags in arm_flags(args).items():
        runs[arm] = []
        for seed in args.seeds:
            folder = args.out / regime / folder_name(arm) / f"seed{seed}"
            reused = args.out / "sweep" / f"lr{lr:g}"
            if regime == "pretrained" and arm == "sherry" and seed == 0 and (reused / LOG_HISTORY).is_file():
                folder = reused
            runs[arm].append(Run(folder, (*qat_flags(init, lr, seed), *flags)))
    return runs


def arms(args: argparse.Namespace, pretrained: Path, lr: float) -> None:
    regimes = [("pretrained", str(pretrained), lr)]
    if args.control:
        regimes.append(("scratch", "scratch", args.scratch_lr))
    for regime, init, rate in regimes:
        runs = [run for arm in arm_runs(args, regime, init, rate).values() for run in arm]
        shared = shared_flags(args, args.steps) + (scratch_flags(args)[2:] if regime == "scratch" else [])
        execute(runs, shared, args.jobs)


# --- report ---------------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], digits: int = 2) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def run_record(folder: Path, heldout, window: int) -> dict:
    """Held-out perplexity (λ = 0) and the logged curves of one finished run."""
    from heldout_ppl import perplexity

    from sherry_export.qat import load_qat_model

    model, _ = load_qat_model(str(folder))
    history = json.loads((folder / LOG_HISTORY).read_text())
    diagnostics = [e for e in history if "grad_erank" in e]
    return {
        "folder": str(folder),
        "heldout_ppl": perplexity(model.eval(), heldout, window),
        "eval_loss": {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e},
        "grad_erank": {e["step"]: e["grad_erank"] for e in diagnostics},
        "grad_erank_lambda0": {e["step"]: e["grad_erank_lambda0"] for e in diagnostics if "grad_erank_lambda0" in e},
        "grad_erank_layers": {
            e["step"]: [v for k, v in sorted(e.items()) if k.startswith("grad_erank_layer")] for e in diagnostics
        },
        "zero_flip_rate": {e["step"]: e["zero_flip_rate"] for e in diagnostics if "zero_flip_rate" in e},
        "value_flip_rate": {e["step"]: e["value_flip_rate"] for e in diagnostics if "value_flip_rate" in e},
    }


def reference_erank(args: argparse.Namespace, folder: Path) -> list[float]:
    """∂L/∂X effective ranks of the full-precision model on the batch ``--diagnostics`` probes (the first
    ``--batch`` held-out windows): the value before any projection, for the diagnostics table."""
    import numpy as np
    import torch

    from sherry_export.diagnostics import gradient_effective_ranks
    from sherry_export.qat import load_qat_model

    tokens = heldout_tokens(args, folder, args.batch * args.seq_len)
    model, _ = load_qat_model(str(folder))
    windows = len(tokens) // args.seq_len  # as TokenBlocks cuts the probe: at most --batch whole windows
    ids = torch.from_numpy(np.asarray(tokens[: windows * args.seq_len], dtype=np.int64)).view(windows, args.seq_len)
    return gradient_effective_ranks(model, ids)


def heldout_tokens(args: argparse.Namespace, folder: Path, count: int):
    from sherry_export import data
    from sherry_export.models import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source(str(folder)))
    if args.data == "corpora":
        streams = data.corpus_tokens(tokenizer, args.cache)
    else:
        streams = data.text_file_tokens(Path(args.data), tokenizer)
    return streams["heldout"][:count]


def verdict(label_a: str, a: list[float], label_b: str, b: list[float]) -> str:
    """Whether arm a's perplexity differs from arm b's beyond twice the larger standard deviation."""
    (mean_a, sd_a), (mean_b, sd_b) = mean_sd(a), mean_sd(b)
    gap, bar = mean_a - mean_b, 2 * max(sd_a, sd_b)
    relative = f"{gap:+.2f} ({100 * gap / mean_b:+.1f} %)"
    if len(a) < 2 or len(b) < 2:
        return f"{label_a} vs {label_b}: {relative}; one seed, no call"
    call = ("better" if gap < 0 else "worse") if abs(gap) > bar else "no difference beyond 2 sd"
    return f"{label_a} vs {label_b}: {relative}, 2 sd = {bar:.2f}: **{call}**"


def report(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from sherry_export.report import markdown_table

    pretrained = args.out / "pretrain"
    heldout = heldout_tokens(args, pretrained, args.ppl_tokens)
    chosen = json.loads((args.out / "chosen_lr.json").read_text())
    results: dict = {"chosen_lr": chosen, "heldout_tokens": len(heldout), "regimes": {}}
    reference = run_record(pretrained, heldout, args.window)
    results["pretrained_ppl"] = reference["heldout_ppl"]
    results["pretrained_grad_erank"] = reference_erank(args, pretrained)
    regimes = [("pretrained", chosen["lr"])] + ([("scratch", args.scratch_lr)] if args.control else [])
    erank = statistics.fmean(results["pretrained_grad_erank"])
    lines = [f"Held-out perplexity (λ = 0), first {len(heldout)} held-out tokens, windows of {args.window}; "
             f"pretrained full-precision start: {reference['heldout_ppl']:.2f}; constant lr {chosen['lr']:g} "
             f"(sweep: {chosen['eval_loss']}); the pretrained model's normalised ∂L/∂X effective rank "
             f"(full precision, the diagnostics' probe batch): {erank:.3f}",
             ""]  # fmt: skip
    for regime, lr in regimes:
        init = str(pretrained) if regime == "pretrained" else "scratch"
        records = {
            arm: [run_record(run.folder, heldout, args.window) for run in runs if run.done]
            for arm, runs in arm_runs(args, regime, init, lr).items()
        }
        records = {arm: recs for arm, recs in records.items() if recs}
        results["regimes"][regime] = records
        ppl = {arm: [r["heldout_ppl"] for r in recs] for arm, recs in records.items()}
        header = ["arm", *[f"seed {s}" for s in args.seeds], "mean ± sd"]
        rows = [[arm, *[f"{p:.2f}" for p in values], fmt(values)] for arm, values in ppl.items()]
        lines += [f"### From {regime}", "", markdown_table(header, rows), ""]
        steps = sorted({step for recs in records.values() for r in recs for step in r["eval_loss"]})
        rows = [[arm, *[fmt([r["eval_loss"][s] for r in recs if s in r["eval_loss"]], 3) for s in steps]]
                for arm, recs in records.items()]  # fmt: skip
        lines += ["Eval loss (λ = 0) by step, mean ± sd over seeds:", "",
                  markdown_table(["arm", *map(str, steps)], rows), ""]  # fmt: skip
        rows = []
        for arm, recs in records.items():
            first, last = min(recs[0]["grad_erank"]), max(recs[0]["grad_erank"])
            flips = [statistics.fmean(r["zero_flip_rate"].values()) for r in recs if r["zero_flip_rate"]]
            lambda0 = [v for r in recs for v in r["grad_erank_lambda0"].values()]
            rows.append([arm, fmt([r["grad_erank"][first] for r in recs], 3),
                         fmt([r["grad_erank"][last] for r in recs], 3),
                         fmt(lambda0, 3) if lambda0 else "–", fmt(flips, 4) if flips else "–"])  # fmt: skip
        lines += ["Diagnostics: normalised effective rank of ∂L/∂X (mean over layers) at the first and last "
                  "evaluation, at λ = 0 while λ > 0 (all intervals), and the mean fraction of 3:4 zero "
                  "positions (ternary: zero states) that changed per evaluation interval:", "",
                  markdown_table(["arm", f"erank step {first}", f"erank step {last}", "erank at λ = 0 while λ > 0",
                                  "zero flips per interval"], rows), ""]  # fmt: skip
        if "sherry" in ppl:
            for arm in ppl:
                if arm.startswith("sherry+arenas"):
                    lines.append("- " + verdict(arm, ppl[arm], "sherry", ppl["sherry"]))
            if "dense ternary" in ppl:
                lines += ["- " + verdict(arm, ppl[arm], "dense ternary", ppl["dense ternary"])
                          for arm in ppl if arm.startswith("sherry")]  # fmt: skip
        lines.append("")
    text = "\n".join(lines)
    (args.out / "report.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.out / "arenas_ablation.png")
    print(text)
    return results


def plot(results: dict, path: Path) -> None:
    """Eval loss and gradient effective rank over training, one line per arm (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = results["regimes"]
    fig, axes = plt.subplots(len(regimes), 2, figsize=(11, 4 * len(regimes)), squeeze=False)
    for row, (regime, records) in enumerate(regimes.items()):
        for column, key, label in ((0, "eval_loss", "eval loss (λ = 0)"), (1, "grad_erank", "∂L/∂X effective rank")):
            axis = axes[row][column]
            for arm, recs in records.items():
                steps = sorted(recs[0][key], key=float)
                values = [statistics.fmean(r[key][s] for r in recs if s in r[key]) for s in steps]
                axis.plot([float(s) for s in steps], values, marker="o", label=arm)
            axis.set(xlabel="optimizer step", ylabel=label, title=f"from {regime}")
            axis.grid(alpha=0.3)
        axes[row][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("all", "pretrain", "sweep", "arms", "report"))
    parser.add_argument("--out", type=Path, default=Path("runs/arenas"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (1 thread each)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--group-size", type=int, help="Sherry scale group (default: sherry train's, 128)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--pretrain-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=200, help="QAT optimizer steps per arm")
    parser.add_argument("--evals", type=int, default=4, help="evaluations (with diagnostics) per run")
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--lambda-max", type=float, nargs="+", default=[1.0, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--control", action="store_true", help="also run the arms from scratch")
    parser.add_argument("--scratch-lr", type=float, default=1e-3)
    parser.add_argument("--data", default="corpora", help="'corpora' or a text file (tests)")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--ppl-tokens", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args(argv)
    if args.stage in ("all", "pretrain", "sweep", "arms"):
        pretrained = pretrain(args)
        if args.stage != "pretrain":
            chosen = args.out / "chosen_lr.json"
            lr = json.loads(chosen.read_text())["lr"] if args.stage == "arms" and chosen.is_file() else None
            lr = sweep(args, pretrained) if lr is None else lr
            if args.stage in ("all", "arms"):
                arms(args, pretrained, lr)
    if args.stage in ("all", "report"):
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
