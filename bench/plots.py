"""PNG plots of the benchmark results (matplotlib, Agg backend: no display needed)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .common import run_label  # noqa: E402
from .models import model_title  # noqa: E402

STYLE = {"triton": ("tab:blue", "o"), "triton_fp8": ("tab:purple", "v"), "triton_int8": ("tab:red", "P"),
         "cuda": ("tab:orange", "s"), "cuda_fp8": ("tab:brown", "X"), "cuda_int8": ("tab:pink", "*"),
         "torch": ("tab:gray", "^"), "sdpa": ("tab:green", "D")}


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def kernel_bandwidth(result, out_dir) -> list:
    """One figure per (head shape, dtype, block size): GB/s vs context, a panel per batch size."""
    from .kernels import COLUMN_TITLES, COLUMNS, SHAPES
    points, copy_gbps = result["points"], result["copy_bandwidth"]["gbps"]
    paths = []
    for shape_name, dtype, block_size in sorted({(p["shape"], p["dtype"], p["block_size"]) for p in points}):
        group = [p for p in points if (p["shape"], p["dtype"], p["block_size"]) == (shape_name, dtype, block_size)]
        batches = sorted({p["batch"] for p in group})
        fig, axes = plt.subplots(1, len(batches), figsize=(3.6 * len(batches), 3.6), sharey=True, squeeze=False)
        for ax, batch in zip(axes[0], batches):
            rows = sorted((p for p in group if p["batch"] == batch), key=lambda p: p["context"])
            for name in COLUMNS:
                ok = [(p["context"], p["columns"][name]["gbps"]) for p in rows if p["columns"][name]["status"] == "ok"]
                color, marker = STYLE[name]
                if ok:
                    ax.plot(*zip(*ok), color=color, marker=marker, label=COLUMN_TITLES[name])
                else:  # keep it in the legend: a missing column must not look like an omission
                    status = rows[0]["columns"][name]["status"]
                    ax.plot([], [], color=color, marker=marker, linestyle="none",
                            label=f"{COLUMN_TITLES[name]}: {status}")
            copy_mib = result["copy_bandwidth"]["bytes_moved"] / 2 / 2**20
            ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1,
                       label=f"copy of {copy_mib:,.0f} MiB: {copy_gbps:,.0f} GB/s")
            ax.set_xscale("log", base=2)
            ax.set_xticks([p["context"] for p in rows], [_tokens(p["context"]) for p in rows])
            ax.set_title(f"batch {batch}")
            ax.set_xlabel("context (tokens)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("GB/s of K+V read")
        axes[0][0].set_ylim(bottom=0)
        axes[0][-1].legend(fontsize=7, loc="best")
        shape = SHAPES[shape_name]
        fig.suptitle(f"{run_label(result)}Paged decode attention, {shape.num_heads}/{shape.num_kv_heads} heads x "
                     f"{shape.head_dim}, "
                     f"{dtype}, block {block_size} — {result['environment']['device']}", fontsize=9)
        paths.append(_save(fig, out_dir / f"kernels_bw_{shape_name}_{dtype}_bs{block_size}.png"))
    return paths


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _mode_colors(runs) -> dict:
    """One colour per mode, the same in every figure of a result."""
    cmap = plt.get_cmap("tab10")
    return {mode: cmap(i % 10) for i, mode in enumerate(dict.fromkeys(r["mode"] for r in runs))}


def _mark_failed(ax, x, text):
    ax.annotate(text, (x, 0.02), xycoords=("data", "axes fraction"), rotation=90, ha="center", va="bottom",
                fontsize=7, color="red")


def generate_tokens_per_s(result, out_dir, name="generate") -> list:
    """One figure per (model, dtype): median tokens/s per mode (min-max whiskers), grouped by batch size."""
    runs = result["runs"]
    paths = []
    for model, dtype in sorted({(r["model"], r["dtype"]) for r in runs}):
        group = [r for r in runs if (r["model"], r["dtype"]) == (model, dtype)]
        batches = sorted({r["batch"] for r in group})
        modes = list(dict.fromkeys(r["mode"] for r in group))
        width = 0.8 / len(modes)
        colors = _mode_colors(runs)
        fig, ax = plt.subplots(figsize=(min(12.0, 2.0 + 0.5 * len(modes) * len(batches)), 4.2))
        for i, mode in enumerate(modes):
            for j, batch in enumerate(batches):
                run = next((r for r in group if r["mode"] == mode and r["batch"] == batch), None)
                x = j + (i - (len(modes) - 1) / 2) * width
                label = mode if j == 0 else None
                if run and run["status"] == "ok":
                    tps = run["tokens_per_s"]
                    ax.bar(x, tps["median"], width, color=colors[mode], label=label,
                           yerr=[[tps["median"] - tps["min"]], [tps["max"] - tps["median"]]], capsize=2)
                else:
                    ax.bar(x, 0, width, color=colors[mode], label=label)
                    _mark_failed(ax, x, run["status"] if run else "n/a")
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("tokens/s (median, min-max)")
        ax.set_ylim(bottom=0)   # linear from zero: bar lengths proportional to throughput
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"{run_label(result)}{model_title(model)}, {dtype}: generation throughput — "
                     f"{result['environment']['device']}", fontsize=9)
        paths.append(_save(fig, out_dir / f"{name}_tps_{model}_{dtype}.png"))
    return paths


def generate_latency(result, out_dir, name="generate") -> list:
    """One figure per (model, dtype): per-token latency over position, a panel per batch size."""
    runs = result["runs"]
    paths = []
    for model, dtype in sorted({(r["model"], r["dtype"]) for r in runs}):
        group = [r for r in runs if (r["model"], r["dtype"]) == (model, dtype)]
        batches = sorted({r["batch"] for r in group})
        colors = _mode_colors(runs)
        fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.8), squeeze=False)
        for ax, batch in zip(axes[0], batches):
            for run in (r for r in group if r["batch"] == batch):
                gaps = run.get("per_token_ms") or []
                known = [(i + 1, g) for i, g in enumerate(gaps) if g is not None]
                if run["status"] == "ok" and not run.get("per_token_comparable", True):
                    ax.plot([], [], linestyle="none", label=f"{run['mode']}: not plotted, no streamer "
                                                            "(HF's own timestamps)")
                elif run["status"] == "ok" and known:
                    ax.plot(*zip(*known), label=run["mode"], linewidth=1, color=colors[run["mode"]],
                            marker="." if len(known) < 30 else None)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"batch {batch}")
            ax.set_xlabel("generated token index")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("ms from one token to the next")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{run_label(result)}{model_title(model)}, {dtype}: per-token latency over position — "
                     f"{result['environment']['device']}",
                     fontsize=9)
        paths.append(_save(fig, out_dir / f"{name}_latency_{model}_{dtype}.png"))
    return paths


def seeds_times(result, out_dir) -> list:
    """Seconds per generation for each seed experiment: our columns beside the seed's own reported numbers."""
    from .seeds import COLUMNS
    seeds = result["seeds"]
    fig, axes = plt.subplots(1, len(seeds), figsize=(3.4 * len(seeds), 4.0), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, seed in zip(axes[0], seeds):
        labels, values, colors, hatches = [], [], [], []
        for i, column in enumerate(COLUMNS):
            cell = seed["columns"][column]
            labels.append(column)
            values.append(cell["seconds"]["mean"] if cell["status"] == "ok" else 0.0)
            colors.append(cmap(i))
            hatches.append("")
        for key, label in (("no_cache_s", "seed: no cache"), ("cache_s", "seed: cache")):
            if seed["reported"].get(key) is not None:
                labels.append(label)
                values.append(seed["reported"][key])
                colors.append("white")
                hatches.append("//")
        bars = ax.bar(range(len(values)), values, color=colors, edgecolor="black", linewidth=0.6)
        for bar, hatch, value in zip(bars, hatches, values):
            bar.set_hatch(hatch)
            if value == 0.0:
                _mark_failed(ax, bar.get_x() + bar.get_width() / 2, "failed")
        ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=7)
        tokens = f"{seed['new_tokens']} tokens"
        if seed["new_tokens"] != seed["seed_new_tokens"]:
            tokens += f" (seed: {seed['seed_new_tokens']})"
        model = seed["model"] if seed["shape"] == seed["model"] else f"{seed['model']} (ran: {seed['shape']})"
        ax.set_title(f"{seed['file'][:3]} {model}\n{tokens}", fontsize=8)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("seconds per generation (mean)")
    if result.get("quick"):  # tiny-model CPU seconds beside the seeds' GPU seconds: say it
        ours = (f"ours = a tiny GPT-2, a few tokens, on {result['environment']['device']}; NOT comparable with "
                "the seeds' numbers beside them (full models, their GPUs)")
    else:
        ours = (f"ours on {result['environment']['device']} (random weights) vs the seeds' reported numbers "
                "(pretrained weights, their GPUs)")
    fig.suptitle(f"{run_label(result)}Seed experiments: {ours}", fontsize=9)
    return [_save(fig, out_dir / "seeds_time.png")]
