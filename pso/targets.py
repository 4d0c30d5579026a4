"""Target images with captions (style transfer, concept customization: docs/pso.md, "Target vs online
reference"), their VAE latents in the sampler's state units, and an on-disk cache of those latents.

Where targets come from (`load_targets(source, ...)`):

  FOLDER                 the Hugging Face `imagefolder` layout: image files plus a `metadata.jsonl`, one JSON
                         object a line with `file_name` (relative to the folder) and the caption column
                         (`text` unless told); every image in the folder must have a line, every line an image
  FILE.parquet, FOLDER   parquet files (a folder's `*.parquet`, subfolders included, in name order) with an image
                         column (`{"bytes": ...}` structs, as `datasets.Image` writes them, or raw bytes) and the
                         caption column; read with `datasets`
  hf:OWNER/NAME          a Hugging Face dataset, read with `datasets.load_dataset` (its `split`); `OWNER/NAME`
                         alone works too when no such local path exists

Every image is checked from its header before it is decoded (at most MAX_PIXELS pixels: decompression bombs,
the reward server's default limit; a short side of at least half of `image_size`), turned upright as its EXIF
says, made RGB (alpha dropped), then resized so its short side is `image_size` (PIL's LANCZOS) and centre
cropped to an `image_size` square. Any bad target is a ValueError naming the file (and row or line) and the
problem: a target set is small and hand-made, so it is fixed, not silently thinned.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

if TYPE_CHECKING:
    from pso.config.schema import TargetsConfig
    from pso.policy import DistilledPolicy

log = logging.getLogger(__name__)

MAX_TARGETS = 10_000  # the default cap on a target set's size (`max_images`)
MAX_PIXELS = 4096 * 4096  # width x height of one image, checked from its header (the reward server's default)
MIN_SIDE_FRACTION = 0.5  # an image's short side must be at least this fraction of image_size
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA = "metadata.jsonl"
HUB_PREFIX = "hf:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TargetSet:
    """N targets; target i (its stable id) has `captions[i]`, `images[i]` and came from `files[i]`."""

    captions: list[str]
    images: Tensor  # (N, 3, image_size, image_size) uint8; `pixels()` gives floats in [0, 1]
    files: list[str]  # where each came from: a file's path, or "FILE.parquet, row K", for messages and records
    source: str
    image_size: int
    digest: str = field(repr=False)  # sha256 over every target's caption and image bytes, in order

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def ids(self) -> list[int]:
        return list(range(len(self)))

    def pixels(self, index: slice | list[int] | Tensor | None = None) -> Tensor:
        """The images (or those at `index`) as float32 in [0, 1], (n, 3, image_size, image_size)."""
        images = self.images if index is None else self.images[index]
        return images.float() / 255


# ----- one image -----


def min_side(image_size: int) -> int:
    return math.ceil(image_size * MIN_SIDE_FRACTION)


def image_tensor(raw: bytes, image_size: int, where: str, *, max_pixels: int = MAX_PIXELS) -> Tensor:
    """Encoded image bytes to a (3, image_size, image_size) uint8 tensor (the module's rule: header checks,
    EXIF orientation, RGB, short side resized to image_size with LANCZOS, centre crop). ValueError naming
    `where` if the image is unreadable, too large or too small."""
    if not isinstance(raw, bytes | bytearray) or not raw:
        raise ValueError(f"{where}: no image bytes")
    try:
        im = Image.open(io.BytesIO(raw))  # reads the header only
    except Image.DecompressionBombError:
        raise ValueError(f"{where}: over the pixel limit of {max_pixels} (a decompression bomb?)") from None
    except Exception as e:
        raise ValueError(f"{where}: not a readable image ({type(e).__name__}: {str(e)[:200]})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ValueError(f"{where}: {w}x{h} pixels is over the limit of {max_pixels} (a decompression bomb?)")
    need = min_side(image_size)
    if min(w, h) < need:
        raise ValueError(
            f"{where}: {w}x{h} is too small for image_size {image_size} (the short side must be at least {need} px)"
        )
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: keep the top 8 bits
            im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8))
        im = im.convert("RGB")
    except Exception as e:
        raise ValueError(f"{where}: a corrupt image ({type(e).__name__}: {str(e)[:200]})") from None
    return torch.from_numpy(np.asarray(resize_crop(im, image_size)).copy()).permute(2, 0, 1).contiguous()


def resize_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is `size` (LANCZOS), then crop the centre `size` x `size` square."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def check_caption(caption: Any, column: str, where: str) -> str:
    if caption is None:
        raise ValueError(f"{where}: no caption (the {column!r} column is missing or null)")
    if not isinstance(caption, str):
        raise ValueError(f"{where}: the caption ({column!r}) must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise ValueError(f"{where}: the caption ({column!r}) is empty")
    return caption.strip()


def image_bytes(value: Any, where: str) -> bytes:
    """The bytes of an image cell: raw bytes, or a `{"bytes": ..., "path": ...}` struct (datasets.Image with
    decode off); a struct with only a path reads that file."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            try:
                return Path(value["path"]).read_bytes()
            except OSError as e:
                raise ValueError(f"{where}: cannot read the image file {value['path']} ({e})") from None
    raise ValueError(f"{where}: no image (expected bytes or a {{'bytes': ...}} struct, got {type(value).__name__})")


# ----- sources -----


def hub_id(source: str) -> str | None:
    """The dataset id `source` names on the hub: `hf:OWNER/NAME`, or `OWNER/NAME` when no such local path exists."""
    if source.startswith(HUB_PREFIX):
        return source[len(HUB_PREFIX) :]
    if _HUB_ID.match(source) and not Path(source).exists():
        return source
    return None


def parquet_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*.parquet") if p.is_file())


def open_parquet(files: list[Path], *, streaming: bool = True):
    """Local parquet files as one `datasets` split, image columns left undecoded (bytes)."""
    import datasets

    try:
        ds = datasets.load_dataset(
            "parquet", data_files=[str(f) for f in files], split="train", streaming=streaming
        ).decode(False)
    except Exception as e:
        names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise ValueError(f"{names}: cannot read as parquet ({type(e).__name__}: {str(e)[:300]})") from None
    return ds


def open_hub(name: str, split: str, *, what: str, local_help: str):
    """A hub dataset's split, streamed and undecoded; offline or missing, a ValueError that says how to give
    the data as local files instead."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=True).decode(False)
    except Exception as e:
        raise ValueError(
            f"cannot load the Hugging Face dataset {name!r} (split {split!r}) for the {what}: "
            f"{type(e).__name__}: {str(e)[:300]}. Without a network (HF_HUB_OFFLINE=1 here) give the data as local "
            f"files: on a machine that reaches the hub run `hf download {name} --repo-type dataset --local-dir DIR`, "
            f"copy DIR here and give its path ({local_help})"
        ) from None


def check_columns(columns: Iterable[str] | None, needed: Iterable[str], where: str) -> None:
    if columns is None:
        return
    have = list(columns)
    missing = [c for c in needed if c not in have]
    if missing:
        raise ValueError(
            f"{where}: missing the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(its columns: {', '.join(have) or 'none'})"
        )


def _column_names(ds) -> list[str] | None:
    return list(ds.features) if ds.features is not None else None


Raw = tuple[str, Any, Callable[[], bytes]]  # where, caption, the image's bytes (read lazily)


def _imagefolder(folder: Path, caption_column: str) -> list[Raw]:
    meta = folder / METADATA
    if not meta.is_file():
        images = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise ValueError(
                f"{folder}: no targets (no {METADATA}, no images and no parquet files): give a folder of images "
                f"with a {METADATA}, parquet files, or hf:OWNER/NAME"
            )
        raise ValueError(
            f"{folder}: {len(images)} images but no {METADATA} to caption them: add one JSON object a line, "
            f'e.g. {{"file_name": "{images[0].relative_to(folder).as_posix()}", "{caption_column}": "..."}}'
        )
    try:
        text = meta.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta}: cannot read ({e})") from None
    root = folder.resolve()
    rows: list[Raw] = []
    listed: dict[Path, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{meta}, line {n}"
        try:
            item = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object with file_name and {caption_column!r}")
        name = item.get("file_name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: no file_name (a path relative to {folder})")
        path = (folder / name).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"{where}: file_name {name!r} is outside the folder {folder}")
        if path in listed:
            raise ValueError(f"{where}: {name} is listed twice (first on line {listed[path]})")
        if not path.is_file():
            raise ValueError(f"{where}: {name} is listed in {METADATA} but missing from {folder}")
        listed[path] = n
        caption = check_caption(item.get(caption_column), caption_column, f"{where} ({name})")
        rows.append((str(folder / name), caption, path.read_bytes))
    unlisted = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.resolve() not in listed
    )
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise ValueError(
            f"{unlisted[0]}: an image in the folder with no entry in {meta}{more}: add a line for it "
            f'({{"file_name": "{unlisted[0].relative_to(folder).as_posix()}", "{caption_column}": "..."}}) '
            "or move it out"
        )
    return rows


def _rows(ds, where: str, caption_column: str, image_column: str, limit: int) -> Iterator[Raw]:
    check_columns(_column_names(ds), (image_column, caption_column), where)
    for k, row in enumerate(ds):
        if k == 0:
            check_columns(row.keys(), (image_column, caption_column), where)
        if k >= limit:
            return
        cell = row.get(image_column)
        here = f"{where}, row {k}"
        yield here, row.get(caption_column), lambda cell=cell, here=here: image_bytes(cell, here)


BUILTIN_DATA = {"builtin:tiny-style": "style", "builtin:tiny-subject": "subject", "builtin:tiny-offline": "offline"}


def builtin_data(source: str) -> str:
    """A built-in tiny-world data set (pso/tiny/tasks.py) as the folder it is written to on first use (under
    $PSO_CACHE_DIR, default ~/.cache/pso: generated from seed 0, byte-identical everywhere), else `source`.
    Each build goes to a folder of its own and is renamed into place whole, so processes starting together
    (`pso up`'s actors and learner) never see half of one."""
    if not source.startswith("builtin:"):
        return source
    if source not in BUILTIN_DATA:
        raise ValueError(f"unknown built-in data set {source!r}; built-in: {', '.join(BUILTIN_DATA)}")
    from pso.tiny.tasks import DATA_VERSION, build_task_data

    task = BUILTIN_DATA[source]
    root = Path(os.environ.get("PSO_CACHE_DIR") or Path.home() / ".cache" / "pso") / "tiny-data"
    final = root / f"{task}-v{DATA_VERSION}"
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{task}-"))
        try:
            build_task_data(task, tmp)
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not another process's build, renamed first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def _target_rows(
    source: str | Path, caption_column: str, image_column: str, split: str, max_images: int | None
) -> Iterator[Raw]:
    """Every target of `source` in order, as (where, caption, read its image's bytes), captions checked. At most
    `max_images` (default MAX_TARGETS): a larger set is refused, not cut; an empty one too."""
    limit = MAX_TARGETS if max_images is None else max_images
    if limit < 1:
        raise ValueError(f"max_images must be positive, got {limit}")
    spec = builtin_data(str(source))
    name = hub_id(spec)
    path = Path(spec)
    if name is not None:
        ds = open_hub(
            name,
            split,
            what="targets",
            local_help=f"a folder of images with a {METADATA}, or parquet files with "
            f"{image_column!r} and {caption_column!r} columns",
        )
        raws: Iterable[Raw] = _rows(ds, f"hf:{name} ({split})", caption_column, image_column, limit + 1)
    elif path.is_dir() and (path / METADATA).is_file():
        raws = _imagefolder(path, caption_column)
    elif path.exists() and (files := parquet_files(path)) and all(f.suffix == ".parquet" for f in files):
        where = str(path) if len(files) == 1 else f"{path} ({len(files)} parquet files)"
        raws = _rows(open_parquet(files), where, caption_column, image_column, limit + 1)
    elif path.is_dir():
        raws = _imagefolder(path, caption_column)  # explains what is missing
    elif path.exists():
        raise ValueError(f"{path}: not a parquet file; give a folder of images with a {METADATA} or parquet files")
    else:
        raise ValueError(
            f"{spec}: no such file or folder; targets are a folder of images with a {METADATA}, parquet files, "
            "or hf:OWNER/NAME"
        )
    if isinstance(raws, list) and len(raws) > limit:
        raise ValueError(
            f"{spec}: {len(raws)} targets, more than {limit} (the limit, max_images): pick a subset or raise max_images"
        )
    n = 0
    for where, caption, read in raws:
        if n >= limit:
            raise ValueError(
                f"{spec}: more than {limit} targets (the limit, max_images): pick a subset or raise max_images"
            )
        yield where, check_caption(caption, caption_column, where), read
        n += 1
    if not n:
        raise ValueError(f"{spec}: no targets (zero rows or images)")


def load_targets(
    source: str | Path,
    *,
    image_size: int,
    caption_column: str = "text",
    image_column: str = "image",
    split: str = "train",
    max_images: int | None = None,
) -> TargetSet:
    """The targets `source` names (see the module's docstring), each image `image_size` square. At most
    `max_images` targets (default MAX_TARGETS): a larger set is refused, not cut."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    captions, images, files = [], [], []
    digest = hashlib.sha256()
    for where, text, read in _target_rows(source, caption_column, image_column, split, max_images):
        raw = read()
        images.append(image_tensor(raw, image_size, where))
        captions.append(text)
        files.append(where)
        for part in (text.encode(), raw):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return TargetSet(captions, torch.stack(images), files, builtin_data(str(source)), image_size, digest.hexdigest())


# ----- latents -----


@torch.no_grad()
def encode_images(policy: DistilledPolicy, batches: Iterable[Tensor]) -> Tensor:
    """Images, given as batches of (b, 3, S, S) floats in [0, 1] at the model's image size, as final sampler
    states (n, *policy.latent_shape), float32 on the CPU: each denoiser's own `vae_encode`, the inverse of its
    `decode` (target images here, preference pairs in pso/offline.py)."""
    latents = torch.cat([policy.denoiser.vae_encode(images).cpu() for images in batches]).contiguous()
    if tuple(latents.shape[1:]) != tuple(policy.latent_shape):
        raise NotImplementedError(
            f"the VAE gave latents of shape {tuple(latents.shape[1:])}, the sampler's states are "
            f"{tuple(policy.latent_shape)}: {policy.denoiser.arch!r} needs its own encode rule"
        )
    return latents


def encode_targets(policy: DistilledPolicy, targets: TargetSet, batch_size: int = 16) -> Tensor:
    """The targets' latents (N, *policy.latent_shape), float32 on the CPU, in the sampler's state units:
    `policy.decode(latents)` gives the images back (up to the VAE's reconstruction error)."""
    if targets.image_size != policy.image_size:
        raise ValueError(
            f"{targets.source}: the targets are {targets.image_size} px, the model samples {policy.image_size} px: "
            f"load them with image_size={policy.image_size}"
        )
    return encode_images(policy, (targets.pixels(slice(i, i + batch_size)) for i in range(0, len(targets), batch_size)))


def vae_identity(policy: DistilledPolicy) -> str:
    """A digest of what turns images into latents: the denoiser's class, the VAE's class and config (its
    path left out) and every VAE tensor's name, dtype, shape and bytes."""
    import xxhash

    vae = policy.pipe.vae
    config = {k: v for k, v in dict(vae.config).items() if k != "_name_or_path"}
    h = xxhash.xxh3_128()
    described = [type(policy.denoiser).__name__, type(vae).__name__, config]
    h.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cache_problem(meta: dict, latents: Tensor | None, key: str, expected: tuple, fmt: str) -> str | None:
    if meta.get("format") != fmt or meta.get("key") != key:
        return "it was written for other targets or another VAE"
    if latents is None:
        return "it holds no 'latents' tensor alone"
    if latents.dtype != torch.float32 or tuple(latents.shape) != expected:
        return f"its latents are {latents.dtype} {tuple(latents.shape)}, expected torch.float32 {expected}"
    if not torch.isfinite(latents).all():
        return "its latents are not finite"
    return None


class TargetLatentCache:
    """Target latents on disk, one safetensors file per (targets' bytes, VAE, image size), so a restarted
    learner does not encode again. A file is used only when its recorded key, shape, dtype and values check
    out; a stale, corrupt or foreign one is ignored (with a warning) and rewritten."""

    FORMAT = "pso-target-latents/1"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def key(self, policy: DistilledPolicy, targets: TargetSet) -> str:
        parts = [self.FORMAT, targets.digest, str(targets.image_size), vae_identity(policy)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"target-latents-{key[:32]}.safetensors"

    def load(self, policy: DistilledPolicy, targets: TargetSet, key: str | None = None) -> Tensor | None:
        """The cached latents, or None when there are none that can be trusted."""
        from safetensors import safe_open

        key = key or self.key(policy, targets)
        path = self.path(key)
        if not path.is_file():
            return None
        expected = (len(targets), *policy.latent_shape)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                latents = f.get_tensor("latents") if set(f.keys()) == {"latents"} else None
        except Exception as e:
            log.warning("target latent cache %s is unreadable (%s): encoding again", path, str(e)[:200])
            return None
        problem = _cache_problem(meta, latents, key, expected, self.FORMAT)
        if problem:
            log.warning("target latent cache %s is ignored: %s; encoding again", path, problem)
            return None
        return latents

    def save(self, key: str, latents: Tensor, targets: TargetSet) -> Path:
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": self.FORMAT, "key": key, "source": targets.source, "count": str(len(targets))}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"latents": latents.detach().float().cpu().contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    def get(self, policy: DistilledPolicy, targets: TargetSet, batch_size: int = 16) -> Tensor:
        """The targets' latents: from the cache when it holds trustworthy ones, else encoded and cached."""
        key = self.key(policy, targets)
        latents = self.load(policy, targets, key)
        if latents is None:
            latents = encode_targets(policy, targets, batch_size)
            self.save(key, latents, targets)
        return latents


def load_target_set(cfg: TargetsConfig, image_size: int) -> TargetSet:
    """The targets a run's `targets` section names, at the model's image size."""
    return load_targets(
        cfg.source,
        image_size=image_size,
        caption_column=cfg.caption_column,
        image_column=cfg.image_column,
        split=cfg.split,
        max_images=cfg.max_images,
    )


PRIOR_SEED = 2**31 - 1  # the class samples' seed: the same images in every process of a run


def target_captions(cfg: TargetsConfig) -> list[str]:
    """Every target's caption in target order, without decoding an image (what actors need): the images', then
    each class prompt `class_samples` times (prior preservation: target n_images + i is class sample i). The
    learner's `load_target_set` reads the same rows in the same order, and refuses a bad image by name."""
    rows = _target_rows(cfg.source, cfg.caption_column, cfg.image_column, cfg.split, cfg.max_images)
    return [caption for _, caption, _ in rows] + [p for p in cfg.class_prompts for _ in range(cfg.class_samples)]


def is_prior(cfg: TargetsConfig, n_images: int, target: int) -> bool:
    """Whether target index `target` is a class sample (prior preservation) rather than a target image."""
    return target >= n_images


def load_target_latents(cfg: TargetsConfig, policy: DistilledPolicy, cache_dir: str | Path) -> tuple[Tensor, int]:
    """The learner's targets, on the policy's device, and how many of them are images: the images encoded by the
    policy's VAE (once: cached under `cache_dir`), then for prior preservation the base model's own samples of
    the class prompts (the reference model, seeded: the same in every process and after every restart)."""
    targets = load_target_set(cfg, policy.image_size)
    latents = TargetLatentCache(cache_dir).get(policy, targets).to(policy.device)
    log.info("%d target images from %s, latents %s", len(targets), cfg.source, tuple(latents.shape[1:]))
    if cfg.class_prompts:
        from pso.sampling import sample_groups

        prior = sample_groups(
            policy, cfg.class_prompts, cfg.class_samples, PRIOR_SEED, decode=False, reference=True
        ).latents
        latents = torch.cat([latents, prior.to(latents)])
        log.info("%d class samples for prior preservation (weight %g)", len(prior), cfg.prior_weight)
    return latents, len(targets)
