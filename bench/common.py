"""Shared by every benchmark: environment capture, timing, JSON / Markdown writers, output folders."""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
# A CPU smoke run must never land in bench/results/, which holds committed GPU results only.
QUICK_DIR = Path(tempfile.gettempdir()) / "kvkernels-bench-quick"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_run_args(parser, quick_help: str) -> None:
    """The --quick and --out flags every entry point takes."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default=None, help="output folder (default: bench/results, or a temp folder "
                                                     "with --quick)")


def output_dir(out, quick: bool) -> Path:
    path = Path(out) if out else (QUICK_DIR if quick else RESULTS_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- environment -------------------------------------------------------------------------------------

def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as err:  # an absent or broken package is a fact worth recording, not a crash
        return f"unavailable ({type(err).__name__})"


def environment(device: torch.device) -> dict:
    """Everything needed to tell two result files apart: device, versions, date, commit, command line."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        device_name = torch.cuda.get_device_name(device)
        device_info = {"sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    else:
        device_name = f"CPU: {_cpu_name()}"
        device_info = {"cpu_count": os.cpu_count()}
    # A copy of the tree names its commit in KVKERNELS_COMMIT: the GPU machine's copy carried a stale .git.
    commit = os.environ.get("KVKERNELS_COMMIT") or _git("rev-parse", "HEAD")
    return {
        "device": device_name,
        "device_type": device.type,
        **device_info,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "kvkernels": _version("kvkernels"),
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit or "unknown",
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "argv": sys.argv,
    }


def environment_markdown(env: dict) -> str:
    dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
    return (f"Device: **{env['device']}** · torch {env['torch']} · triton {env['triton']}"
            f"{' (interpreter)' if env['triton_interpret'] else ''} · transformers {env['transformers']} · "
            f"commit `{env['git_commit'][:12]}`{dirty} · {env['date_utc']}")


def smoke_run_notice(env: dict) -> str:
    """The Markdown line that heads every --quick result: its numbers are not performance."""
    where = ", the Triton kernels through the Triton interpreter" if env.get("triton_interpret") else ""
    return (f"**Smoke run (--quick) on {env['device']}{where}: tiny shapes, few repeats. The numbers show that "
            "the harness runs; they are not performance results.**")


def run_label(result: dict) -> str:
    """What a plot title must say before its numbers: '' for a full run."""
    if not result.get("quick"):
        return ""
    where = ", Triton interpreter" if result["environment"].get("triton_interpret") else ""
    return f"SMOKE RUN (--quick{where}), not performance: "


# -- timing ------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_us(fn, device: torch.device, *, cpu_reps: int = 3) -> float:
    """Median microseconds of fn().

    CUDA: triton.testing.do_bench, which flushes the L2 before every repetition and times with events.
    CPU (smoke runs only): one warm-up call, then the wall-clock median of `cpu_reps` calls.
    """
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    fn()
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


class Stopwatch:
    """Wall-clock seconds of a block, with the device drained on entry and exit."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = None

    def __enter__(self):
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
        return False


def spread(values) -> dict:
    """Median, mean, std (population, as the seed tutorials' np.std), min and max of a list of floats."""
    values = list(values)
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "std": statistics.pstdev(values), "min": min(values), "max": max(values), "n": len(values)}


def error_string(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text.splitlines()[0][:400] if text else type(err).__name__


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- writers -----------------------------------------------------------------------------------------

def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def load_for_append(path: Path, env: dict, settings: dict) -> dict | None:
    """The earlier result an --append run adds rows to (None if there is none yet).

    Rows from separate invocations may share one table only when device, software and settings match.
    """
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "transformers"):
        if previous["environment"].get(key) != env[key]:
            raise SystemExit(f"--append: {path} was measured with {key} {previous['environment'].get(key)!r}, "
                             f"this run has {env[key]!r}; write to another --out or --name")
    for key, value in settings.items():
        if previous.get("settings", {}).get(key) != value:
            raise SystemExit(f"--append: {path} used {key}={previous.get('settings', {}).get(key)!r}, "
                             f"this run {value!r}")
    return previous


def merge_rows(previous, new, key) -> list:
    """Earlier rows, minus those this run measured again, then this run's rows."""
    fresh = {key(r) for r in new}
    return [r for r in previous if key(r) not in fresh] + list(new)


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits: int = 1, unit: str = "") -> str:
    """Numbers for tables: thousands separators, a fixed number of decimals, '—' for missing."""
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{unit}"
