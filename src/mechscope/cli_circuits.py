"""``mechscope circuits sae``: discrete-SAE circuit discovery from the command line.

Loads the model, runs :func:`mechscope.circuits.sae.default_run` on the model's built-in minimal
pairs for ``--task`` (:func:`~mechscope.circuits.sae.task_batch`) and prints the ranked heads or,
with ``--json``, one object: ``model``, ``analysis``, the result's ``payload()`` (``scores``: the
layer x head node scores; ``heads``: heads with a positive score, best first; ``ranked``,
``edges``, ``pairs``, ``sae``, ``runtime``), ``evaluation`` and ``run_id`` (with ``--store``).
When the model has ground truth (a zoo checkpoint), ``evaluation`` holds ROC-AUC,
precision/recall at the circuit's size, rank correlation with the patching effect and runtime
for the SAE and the baselines (exact head patching, attribution patching, the task's head
detector; :mod:`mechscope.circuits.evaluate`); ``--no-eval`` skips the baselines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli_heads import JsonFlag, NOpt, SeedOpt, SpecArg, StoreOpt, TopOpt, _progress
from mechscope.errors import MechscopeError

circuits_app = typer.Typer(no_args_is_help=True,
                           help="Circuit discovery: discrete sparse-autoencoder circuits.")  # fmt: skip


def _evaluation(model: Any, result: Any, task: str | None, n: int | None, seed: int, cfg: Any,
                progress: bool) -> dict[str, Any] | None:  # fmt: skip
    """ROC-AUC etc. of the SAE (this run's result) and the baselines against the zoo truth
    (None for a model without ground truth)."""
    from mechscope.circuits.evaluate import evaluate_methods
    from mechscope.models.loading import spec_of

    if not (spec_of(model) or "").startswith("zoo:"):
        return None
    ev = evaluate_methods(model, task=task, n=n, seed=seed, sae_config=cfg, sae_result=result,
                          progress=progress)  # fmt: skip
    return ev.payload()


@circuits_app.command("sae")
def sae_cmd(
    spec: SpecArg,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="Minimal pairs: a zoo model's own task (default), or ioi "
            "(default), induction, retrieval_text on a text model.",
        ),
    ] = None,  # fmt: skip
    n: NOpt = None,
    seed: SeedOpt = 0,
    epochs: Annotated[int, typer.Option(min=1, help="SAE training epochs (full batch).")] = 500,
    features: Annotated[int, typer.Option(min=1, help="SAE dictionary size.")] = 200,
    l1: Annotated[float, typer.Option(min=0.0, help="L1 sparsity weight.")] = 0.02,
    n_train: Annotated[
        int, typer.Option("--n-train", min=1, help="Prompts the SAE is trained on.")
    ] = 10,  # fmt: skip
    reduce: Annotated[
        str, typer.Option(help="mean (over positions) or answer (position).")
    ] = "mean",
    evaluate: Annotated[
        bool,
        typer.Option(
            "--eval/--no-eval", help="With ground truth: score the SAE and the baselines."
        ),
    ] = True,  # fmt: skip
    top: TopOpt = 10,
    store: StoreOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Discrete-SAE circuits (O'Neill & Bui 2024): heads ranked by the SAE codes they take only on positives."""
    from mechscope.circuits.sae import REDUCE, SAEConfig, default_run
    from mechscope.cli import _emit
    from mechscope.models import load

    if reduce not in REDUCE:
        raise MechscopeError(f"--reduce must be one of {', '.join(REDUCE)}, got {reduce!r}")
    cfg = SAEConfig(n_features=features, l1=l1, epochs=epochs, n_train=n_train, seed=seed,
                    reduce=reduce)  # fmt: skip
    model = load(spec)
    progress = _progress(as_json)
    result = default_run(model, task=task, n=n, seed=seed, progress=progress, config=cfg)
    evaluation = _evaluation(model, result, task, n, seed, cfg, progress) if evaluate else None
    obj: dict[str, Any] = {"model": spec, "analysis": "sae", **result.payload(top),
                           "evaluation": evaluation, "run_id": None}  # fmt: skip
    if store is not None:
        from mechscope.store import Store

        obj["run_id"] = result.save(Store(Path(store)))
    p, fit = result.pairs, result.fit
    lines = [
        f"discrete-SAE circuit on task {result.task!r}: {obj['n_positive']} positive / "
        f"{obj['n_negative']} negative prompts"
        + (f" (of {p['pairs']} pairs: {p['clean_solved']} solved, kept {p['kept']})" if p else ""),
        f"SAE: {int(fit['n_train_prompts'])} training prompts, {int(fit['alive'])} of "
        f"{cfg.n_features} features alive, {100 * fit['fve']:.0f}% variance explained; "
        f"{result.runtime['total_s']:.1f} s",
        f"top {top} heads by node score (codes used only on positives):",
    ]
    lines += [f"  L{ly:<3} H{h:<3} {s:6.0f}" for ly, h, s in result.ranked_heads()[:top]]
    edges = result.ranked_edges(5)
    if edges:
        lines.append("top edges: " + ", ".join(f"L{a[0]}H{a[1]}-L{b[0]}H{b[1]} ({s:.0f})"
                                               for a, b, s in edges))  # fmt: skip
    if evaluation:
        lines.append(f"against {evaluation['reference'].split(' (')[0]}:")
        lines.append(f"  {'method':<12} {'ROC-AUC':>8} {'P@k':>6} {'spearman':>9} {'time s':>8}")
        for name, m in evaluation["methods"].items():
            auc, pk, sp = (m.get(k) for k in ("roc_auc", "precision_at_k", "spearman_effect"))
            fmt = lambda v, w: f"{v:{w}.3f}" if isinstance(v, float) else f"{'-':>{w}}"  # noqa: E731
            lines.append(f"  {name:<12} {fmt(auc, 8)} {fmt(pk, 6)} {fmt(sp, 9)} "
                         f"{m.get('runtime_s', 0):8.2f}")  # fmt: skip
        for name, why in (evaluation.get("skipped") or {}).items():
            lines.append(f"  {name:<12} skipped: {why}")
    if store is not None:
        lines.append(f"run {obj['run_id']} saved to {store}")
    _emit(obj, as_json, "\n".join(lines))
