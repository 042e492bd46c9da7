"""Markdown report of one benchmark run: settings, machine, the tables of medians and ratios, and the goals."""

from __future__ import annotations

REFERENCE = "img2img"

# (description, numerator, denominator, maximum ratio); numerator and denominator
# name a pipeline row, a UNet row ("unet:KEY") or a pipeline row's peak memory ("memory:KEY").
GOALS = [
    ("DeltaDeno full call vs img2img", "deltadeno", "img2img", 1.25),
    ("DeltaDeno vs DiffEdit", "deltadeno", "diffedit", 0.33),
    ("DeltaDeno processors per UNet call vs `AttnProcessor2_0`", "unet:deltadeno_active", "unet:default", 1.03),
    ("DeltaDeno peak memory vs img2img", "memory:deltadeno", "memory:img2img", 1.10),
    ("`normal_as_negative=True` vs img2img", "deltadeno_normal_as_negative", "img2img", 1.05),
]


def _number(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _lookup(results: dict, name: str) -> float | None:
    if name.startswith("unet:"):
        key = name.removeprefix("unet:")
        return next((row["median_s"] for row in results["unet"] if row["key"] == key), None)
    if name.startswith("memory:"):
        key = name.removeprefix("memory:")
        row = next(row for row in results["pipelines"] if row["key"] == key)
        return row["memory"]["peak_mib"] if row["memory"] else None
    return next(row["median_s"] for row in results["pipelines"] if row["key"] == name)


def evaluate_goals(results: dict) -> list[dict]:
    """Return each goal's measured ratio (None when not measured) and whether it is met."""
    goals = []
    for description, numerator, denominator, maximum in GOALS:
        top, bottom = _lookup(results, numerator), _lookup(results, denominator)
        ratio = top / bottom if top is not None and bottom else None
        goals.append(
            {
                "goal": description,
                "maximum": maximum,
                "ratio": ratio,
                "met": None if ratio is None else ratio <= maximum,
            }
        )
    return goals


def render_report(results: dict) -> str:
    """Render the run as a Markdown section: command, machine, settings and three tables."""
    settings, machine = results["settings"], results["machine"]
    lines = [
        f"### {results['title']}",
        "",
        "```",
        results["command"],
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| Date | {machine['date']} |",
        f"| CPU | {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM |",
        f"| GPU | {machine['gpu']} |",
        f"| Versions | Python {machine['python']}, torch {machine['torch']}, diffusers {machine['diffusers']}, "
        f"transformers {machine['transformers']} |",
        f"| torch threads | {machine['torch_threads']} |",
        f"| Commit | {machine['commit']} |",
        f"| Components | {settings['components']}, random weights, {settings['dtype']} on {settings['device']} |",
        f"| Call | {settings['size']}x{settings['size']} image, {settings['steps']} steps at strength "
        f"{settings['strength']} ({settings['denoising_steps']} denoising steps), guidance {settings['guidance_scale']}, "
        "DDIM, `output_type=\"np\"` |",
        f"| Repeats | {settings['repeats']} interleaved rounds of the pipeline calls after {settings['warmup']} warm-up "
        f"round(s); {settings['unet_repeats']} of the UNet calls |",
        f"| Whole run | {results['elapsed_s'] / 60:.1f} min |",
        "",
    ]
    lines += _pipeline_table(results)
    lines += [""] + _attention_table(results)
    lines += [""] + _goal_table(results)
    return "\n".join(lines) + "\n"


def _pipeline_table(results: dict) -> list[str]:
    rows = results["pipelines"]
    reference = next(row for row in rows if row["key"] == REFERENCE)
    diffedit = next(row for row in rows if row["key"] == "diffedit")
    memory_kind = "peak GPU memory allocated" if results["settings"]["device"].startswith("cuda") else "peak RSS"
    lines = [
        f"Pipeline calls: median seconds per call, the range over the rounds, and {memory_kind} "
        "(whole process, weights included) with the part the call added on top of the resting memory.",
        "",
        f"| configuration | median s | range s | x img2img | x DiffEdit | {memory_kind} MiB | x img2img "
        "| added by the call MiB | x img2img |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        samples = row["samples"]
        cells = [
            row["label"],
            _number(row["median_s"]),
            f"{_number(min(samples))} to {_number(max(samples))}",
            f"{row['median_s'] / reference['median_s']:.2f}",
            f"{row['median_s'] / diffedit['median_s']:.2f}",
        ]
        memory, reference_memory = row["memory"], reference["memory"]
        if memory and reference_memory:
            cells += [
                f"{memory['peak_mib']:.0f}",
                f"{memory['peak_mib'] / reference_memory['peak_mib']:.3f}",
                f"{memory['call_mib']:.0f}",
                f"{memory['call_mib'] / reference_memory['call_mib']:.2f}" if reference_memory["call_mib"] > 0 else "n/a",
            ]
        else:
            cells += ["not measured"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _attention_table(results: dict) -> list[str]:
    lines = [
        "Cross-attention processors, CFG batch of 2 with the bias active: each resolution's first cross-attention "
        "module of the UNet called on its own (milliseconds per call), then whole UNet calls (seconds per call).",
        "",
        "| what | query x key tokens | channels, heads | layers of this shape | `AttnProcessor2_0` | DeltaDeno | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["layers"]:
        side = round(row["query_length"] ** 0.5)
        shape = f"{side}x{side} layer" if side * side == row["query_length"] else f"{row['query_length']}-token layer"
        lines.append(
            f"| {shape} | {row['query_length']} x {row['key_length']} | {row['channels']}, {row['heads']} | {row['count']} "
            f"| {row['default_s'] * 1000:.3g} ms | {row['deltadeno_s'] * 1000:.3g} ms "
            f"| {row['deltadeno_s'] / row['default_s']:.3f} |"
        )
    default = next(row for row in results["unet"] if row["key"] == "default")
    for row in results["unet"]:
        if row["key"] == "default":
            continue
        lines.append(
            f"| {row['label']} | | | | {_number(default['median_s'])} s | {_number(row['median_s'])} s "
            f"| {row['median_s'] / default['median_s']:.3f} |"
        )
    return lines


def _goal_table(results: dict) -> list[str]:
    lines = ["Goals, as ratios measured in this run.", "", "| goal | target | measured | status |", "|---|---:|---:|---|"]
    for goal in evaluate_goals(results):
        measured = "not measured" if goal["ratio"] is None else f"{goal['ratio']:.3f}"
        status = {None: "not measured", True: "met", False: "missed"}[goal["met"]]
        lines.append(f"| {goal['goal']} | <= {goal['maximum']:.2f} | {measured} | {status} |")
    return lines
