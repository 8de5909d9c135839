"""CIFAR-10 (the paper's section 3.3) and any ImageFolder tree, as preprocessed tensors.

Sources of CIFAR-10 (``source=`` in the dataset options; ``auto`` takes the first one present):

- ``official``: the official python release, ``<root>/cifar-10-batches-py/`` (the layout of
  ``torchvision.datasets.CIFAR10``) or the archive ``<root>/cifar-10-python.tar.gz`` itself (read in
  memory, never extracted). Each batch file's MD5 is checked against the official one (the same
  values torchvision checks) before it is parsed. The batches are Python pickles; they are read, as
  torchvision reads them, with ``pickle``, but only after their checksum matched and through an
  unpickler that accepts nothing but NumPy arrays and plain containers. Downloaded from the official
  URL (MD5-verified) when missing, ``download=True`` and online.
- ``jpeg``: ``<root>/cifar10-jpeg.tar.gz``, the JPEG re-encoded copy on these machines (see the data
  folder's README): its SHA-256 is checked against ``JPEG_ARCHIVE_SHA256``. It is **not** official
  CIFAR-10: accuracies measured on it must say so. JPEG removes high frequencies, and ZCA fitted on it
  amplifies exactly those, hence the ``gcn`` (GCN-only) preprocessing variant.

The ``imagefolder`` dataset reads any ``<path>/{train,test}/<class>/<image>`` tree, as a folder or a
tar archive (``.tar``, ``.tar.gz`` ...) of one, read member by member in memory (nothing is extracted,
so no archive path can escape anywhere; members with absolute or ``..`` paths are refused).

Splits: the official order's last ``val_size`` training images are the validation set (the original
code: 45,000 / 5,000). An ImageFolder's training images are sorted (class, file name) and then put in a
fixed pseudo-random order (``torch.randperm`` seeded with 0) before the split, so that the validation
set and ``--train-subset`` mix the classes. Preprocessing (``preprocess.PREPROCESSINGS``; the paper's
``gcn-zca`` by default) is fitted on the training split only. Decoded images and preprocessed splits are
cached (``cache.cached_tensors``), keyed by the source's digest and every option.
"""

from __future__ import annotations

import io
import itertools
import pickle
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from .._values import is_int
from ..errors import ConfigError, DataError
from . import Splits, download_file, file_digest, register_dataset
from .augment import make_augmentation
from .cache import cached_tensors, source_fingerprint
from .preprocess import preprocess_splits, preprocessing_params

# --- the official release (values as in torchvision.datasets.CIFAR10) ---
OFFICIAL_FOLDER = "cifar-10-batches-py"
OFFICIAL_ARCHIVE = "cifar-10-python.tar.gz"
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_BATCHES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
}
TEST_BATCHES = {"test_batch": "40351d587109b95175f43aff81a1287e"}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# --- the JPEG-degraded copy in the shared data folder ---
JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
JPEG_ARCHIVE_SHA256 = "b0d1c7f9fbfc24f75dea86602c573946b4f4519782bd8cfdb031b785149a86f2"

CIFAR_SOURCES = ("auto", "official", "jpeg")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_SEED = 0  # the fixed order of an ImageFolder's training images


# ----------------------------------------------------------------------------------------------------
# official python batches


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and NumPy arrays; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def parse_batch(data: bytes, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels int64 of one official CIFAR-10 python batch.

    The format: a pickled dict with ``data`` (uint8 ``N x 3072``, each row the red, green and blue
    32 x 32 planes in row-major order) and ``labels`` (N integers in 0..9).
    """
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
        x, y = batch["data"], batch["labels"]
    except Exception as exc:
        raise DataError(f"{name} is not a CIFAR-10 python batch ({exc})") from None
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise DataError(f"{name} is not a CIFAR-10 python batch: data {x.dtype} {x.shape}, {len(y)} labels "
                        "(expected uint8 N x 3072 and N labels)")
    labels = torch.tensor(list(y), dtype=torch.int64)
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{name} has labels outside 0..9")
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), labels


def _official_files(root: Path, download: bool) -> Callable[[str], bytes] | None:
    """A reader of the official batch files by name, from the folder or the archive; None if absent."""
    folder = root / OFFICIAL_FOLDER
    names = [*TRAIN_BATCHES, *TEST_BATCHES]
    if all((folder / n).is_file() for n in names):
        return lambda n: (folder / n).read_bytes()
    archive = root / OFFICIAL_ARCHIVE
    if not archive.is_file() and download:
        try:
            download_file(OFFICIAL_URL, root, OFFICIAL_ARCHIVE, OFFICIAL_ARCHIVE_MD5)
        except Exception as exc:  # network errors come in many types
            raise DataError(
                f"CIFAR-10 is missing from {root} and could not be downloaded from {OFFICIAL_URL} ({exc}). "
                f"Put {OFFICIAL_ARCHIVE} or {OFFICIAL_FOLDER}/ there, or point --data-dir / BINARYCONNECT_DATA "
                "at the folder holding it."
            ) from None
    if archive.is_file():
        members: dict[str, bytes] = {}
        try:
            with tarfile.open(archive, "r:*") as tar:
                for m in tar:
                    base = PurePosixPath(m.name)
                    if m.isfile() and base.parent.name == OFFICIAL_FOLDER and base.name in names:
                        members[base.name] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(
                f"{archive} is not a readable tar archive ({exc}); delete it and download it again"
            ) from None
        missing = [n for n in names if n not in members]
        if missing:
            raise DataError(f"{archive} lacks {', '.join(missing)}: it is not the official CIFAR-10 python archive")
        return members.__getitem__
    return None


def _verify_official(read: Callable[[str], bytes], verify: bool) -> str:
    """Check every batch's MD5 against the official one (when ``verify``); return the source fingerprint."""
    import hashlib

    digests = []
    for name, md5 in {**TRAIN_BATCHES, **TEST_BATCHES}.items():
        actual = hashlib.md5(read(name)).hexdigest()
        if verify and actual != md5:
            raise DataError(f"checksum mismatch for CIFAR-10 {name}: expected md5 {md5}, got {actual}. The file "
                            "is corrupt or not the official release: delete it and download it again.")
        digests.append(f"{name}:{actual}")
    return "official:" + ",".join(digests)


def _decode_official(read: Callable[[str], bytes]) -> dict[str, torch.Tensor]:
    """The official batches as uint8 ``{train_x, train_y, test_x, test_y}``, in the official order."""
    out = {}
    for split, batches in (("train", TRAIN_BATCHES), ("test", TEST_BATCHES)):
        parsed = [parse_batch(read(name), name) for name in batches]
        out[f"{split}_x"] = torch.cat([x for x, _ in parsed])
        out[f"{split}_y"] = torch.cat([y for _, y in parsed])
    return out


# ----------------------------------------------------------------------------------------------------
# ImageFolder trees, as folders or archives


def _hidden(name: str) -> bool:
    """Hidden files and folders (``.DS_Store``, macOS's ``._image.png``, ``.ipynb_checkpoints``) are no data."""
    return name.startswith(".")


def _split_class_file(parts: tuple[str, ...], where: str) -> tuple[str, ...] | None:
    """``(split, class, file)`` of an image ``[...]/<train|test>/<class>/<file>``; ``()`` for another file of a
    class folder (not an image by its extension); else None."""
    if any(p in ("..", "") for p in parts):
        raise DataError(f"refusing the archive member {where!r}: its path leaves the archive")
    if len(parts) < 3 or parts[-3] not in ("train", "test") or _hidden(parts[-2]) or _hidden(parts[-1]):
        return None
    if not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
        return ()  # a file of a class folder, but not an image by its extension: skipped, and counted
    return parts[-3], parts[-2], parts[-1]


def _collect_folder(path: Path) -> tuple[list[tuple[str, str, str, Callable[[], bytes]]], list[str], str]:
    """The images of the ImageFolder tree at ``path``, the other files of its class folders (skipped), and
    the tree's root inside ``path`` (``""``: ``path`` itself)."""
    items, skipped = [], []
    for split in ("train", "test"):
        split_dir = path / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not _hidden(p.name)):
            for f in sorted(class_dir.iterdir()):
                if f.is_file() and not _hidden(f.name):
                    if f.name.lower().endswith(IMAGE_EXTENSIONS):
                        items.append((split, class_dir.name, f.name, f.read_bytes))
                    else:
                        skipped.append(f"{split}/{class_dir.name}/{f.name}")
    return items, skipped, ""


def _collect_archive(path: Path) -> tuple[list[tuple[str, str, str, Callable[[], bytes]]], list[str], str]:
    """As ``_collect_folder``, for the one ImageFolder tree in the archive at ``path``
    (``[root/]<train|test>/<class>/<file>``, the root any folder path inside the archive: one, not several);
    DataError for a truncated archive."""
    items, roots, skipped = [], set(), []
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if not (m.isfile() or m.islnk() or m.issym()):  # links: as a folder's reader follows them
                    continue
                name = PurePosixPath(m.name)
                if name.is_absolute():
                    raise DataError(f"refusing the archive member {m.name!r} of {path}: absolute path")
                found = _split_class_file(name.parts, m.name)
                if found == ():
                    skipped.append(m.name)
                elif found is not None:
                    try:
                        member = tar.extractfile(m)
                    except KeyError:  # a link to nothing in the archive: skipped, as a folder's reader skips it
                        continue
                    if member is None:
                        continue
                    data = member.read()
                    items.append((*found, lambda data=data: data))
                    roots.add(PurePosixPath(*name.parts[:-3]).as_posix())
            # tarfile stops quietly where the data end: an archive cut between two members (an interrupted
            # copy) would lose the rest. A complete one ends with a block of zeros.
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise DataError(f"{path} is truncated: it stops after {tar.offset:,} bytes of tar data without "
                                "the end-of-archive marker; copy it again")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable tar archive ({exc})") from None
    if len(roots) > 1:
        raise DataError(f"{path} holds several ImageFolder trees (train/ and test/ under "
                        f"{', '.join(repr(r) for r in sorted(roots))}); an archive must hold one")
    root = next(iter(roots), ".")  # "." : the tree at the archive's top
    return items, skipped, "" if root == "." else root + "/"


def _decode_pil(blob: bytes, name: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            if im.mode.startswith(("I", "F")):  # 16/32-bit integer or float pixels: convert("RGB") saturates them
                raise ValueError(f"{im.mode} pixels; convert the image to 8 bits per channel")
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    except Exception as exc:
        why = "not an image file PIL can read" if type(exc).__name__ == "UnidentifiedImageError" else exc
        raise DataError(f"cannot decode the image {name} ({why})") from None


def _decode(blobs: list[bytes], names: list[str]) -> list[torch.Tensor]:
    """Decode images to uint8 RGB ``(3, H, W)``: JPEGs in one batched libjpeg-turbo call of torchvision
    (60,000 CIFAR-10 JPEGs: about 2 s on one core, PIL about 10 s), anything else and any file
    torchvision cannot read through PIL. torchvision 0.29 deprecates its decoders: without them
    (a later version) everything goes through PIL, with the same pixels for baseline JPEGs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        decode_jpeg = None
    out: list[torch.Tensor | None] = [None] * len(blobs)
    jpeg = [i for i, n in enumerate(names) if n.lower().endswith((".jpg", ".jpeg"))]
    if jpeg and decode_jpeg is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = decode_jpeg([torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpeg],
                                      mode=ImageReadMode.RGB)
            for i, img in zip(jpeg, decoded, strict=True):
                out[i] = img
        except Exception:
            pass  # one bad file fails the whole batch: decode one by one, to name it
    return [img if img is not None else _decode_pil(blobs[i], names[i]) for i, img in enumerate(out)]


def read_image_folder(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Decode ``<path>/{train,test}/<class>/<image>`` (a folder or a tar archive of one).

    Returns ``({train_x, train_y, test_x, test_y}, classes)``: uint8 ``(N, 3, H, W)`` images, int64
    labels indexing the sorted class names of the training split. Training images come sorted by
    (class, file name) and then in the fixed order ``torch.randperm(N, seed SPLIT_SEED)``; test images
    sorted. All images must have one size.
    """
    path = Path(path)
    items, skipped, root = _collect_folder(path) if path.is_dir() else _collect_archive(path)
    others = (f"; it holds {len(skipped)} files of other extensions in class folders, e.g. {skipped[0]}"
              if skipped else "")
    items.sort(key=lambda it: (it[0], it[1], it[2]))
    keys = [it[:3] for it in items]
    repeated = [k for k, nxt in itertools.pairwise(keys) if k == nxt]
    if repeated:  # an archive can list a member twice, or hold two trees: neither is one dataset
        s, c, f = repeated[0]
        raise DataError(f"{path} holds {s}/{c}/{f} more than once ({len(repeated)} repeated images): an "
                        "ImageFolder dataset needs one tree with unique file names (a tar archive appended to, "
                        "or two copies of the tree?)")
    classes = sorted({c for s, c, _, _ in items if s == "train"})
    if len(classes) < 2:
        raise DataError(f"{path} is not an ImageFolder tree: it needs train/<class>/<image> files for at least "
                        f"2 classes (found {len(classes)}), and test/<class>/<image> files; images end in "
                        f"{', '.join(IMAGE_EXTENSIONS)}{others}")
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} files that are not images by their extension (e.g. "
                      f"{skipped[0]}); images end in {', '.join(IMAGE_EXTENSIONS)}", stacklevel=2)
    unknown = sorted({c for s, c, _, _ in items if s == "test"} - set(classes))
    if unknown:
        raise DataError(f"{path}: test classes {', '.join(unknown)} have no training images")
    index = {c: i for i, c in enumerate(classes)}
    tensors: dict[str, torch.Tensor] = {}
    first = None  # (name, shape) of the first image: both splits must match it
    for split in ("train", "test"):
        chosen = [it for it in items if it[0] == split]
        if not chosen:
            raise DataError(f"{path} has no {split}/<class>/<image> files")
        names = [f"{path}{'/' if path.is_dir() else ':' + root}{s}/{c}/{f}" for s, c, f, _ in chosen]
        images = _decode([read() for _, _, _, read in chosen], names)
        first = first or (names[0], images[0].shape)
        for img, name in zip(images, names, strict=True):
            if img.shape != first[1]:
                raise DataError(f"{name} is {tuple(img.shape[1:])} pixels, {first[0]} is {tuple(first[1][1:])}: "
                                "all images of an ImageFolder dataset (train and test) must have one size")
        x = torch.stack(images)
        y = torch.tensor([index[c] for _, c, _, _ in chosen], dtype=torch.int64)
        if split == "train":
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
            x, y = x[order], y[order]
        tensors[f"{split}_x"], tensors[f"{split}_y"] = x, y
    return tensors, classes


# ----------------------------------------------------------------------------------------------------
# splits, preprocessing, caching


def build_splits(
    dataset: str,
    fingerprint: str,
    decode: Callable[[], dict[str, torch.Tensor]],
    val_size: int,
    preprocess: str,
    gcn_scale: float,
    zca_bias: float,
    augment: str,
    cache: bool,
    num_classes: int | None = None,
    **lcn,
) -> Splits:
    """Decode (cached), hold out the last ``val_size`` training images, preprocess (cached), augment.

    ``decode()`` returns uint8 ``{train_x, train_y, test_x, test_y}`` (and optionally ``num_classes``
    as a 0-d tensor). Both cache levels are keyed by ``dataset`` and the source ``fingerprint``; the
    preprocessed one also by ``val_size`` and the preprocessing options.
    """
    transform = make_augmentation(augment)  # validate options before any work
    params = preprocessing_params(preprocess, gcn_scale, zca_bias, **lcn)
    if not is_int(val_size) or val_size < 1:
        raise ConfigError(f"val_size must be a positive integer, got {val_size!r}")
    source = {"dataset": dataset, "source": fingerprint}

    def build() -> dict[str, torch.Tensor]:
        raw, _ = cached_tensors("decoded", source, decode, enabled=cache)
        n = len(raw["train_x"]) - val_size
        if n < 1:
            raise ConfigError(f"val_size must be between 1 and {len(raw['train_x']) - 1} for {dataset}, "
                              f"got {val_size}")
        train_x, (val_x, test_x) = preprocess_splits(
            raw["train_x"][:n], [raw["train_x"][n:], raw["test_x"]], preprocess, gcn_scale, zca_bias, **lcn)
        out = {"train_x": train_x, "train_y": raw["train_y"][:n], "val_x": val_x, "val_y": raw["train_y"][n:],
               "test_x": test_x, "test_y": raw["test_y"]}
        if "num_classes" in raw:
            out["num_classes"] = raw["num_classes"]
        return out

    t, _ = cached_tensors("splits", {**source, "val_size": val_size, "preprocess": params}, build, enabled=cache)
    if "num_classes" in t:
        num_classes = int(t["num_classes"])
    return Splits(t["train_x"], t["train_y"], t["val_x"], t["val_y"], t["test_x"], t["test_y"],
                  num_classes=num_classes or 10, train_transform=transform)


_warned_jpeg = False


def _warn_jpeg() -> None:
    global _warned_jpeg
    if not _warned_jpeg:
        _warned_jpeg = True
        warnings.warn(f"CIFAR-10 read from {JPEG_ARCHIVE}, a JPEG-degraded copy: errors measured on it are not "
                      "errors on official CIFAR-10; say so wherever they are reported", stacklevel=3)


@register_dataset("cifar10")
def load_cifar10(
    root: Path,
    val_size: int = 5_000,
    download: bool = True,
    source: str = "auto",
    preprocess: str = "gcn-zca",
    gcn_scale: float = 55.0,
    zca_bias: float = 0.1,
    augment: str = "none",
    verify: bool = True,
    cache: bool = True,
) -> Splits:
    """CIFAR-10 as ``Splits``: 50,000 - ``val_size`` training, ``val_size`` validation, 10,000 test images.

    ``source``: ``auto`` (official if present, else the JPEG copy if present, else download the
    official release), ``official`` or ``jpeg``. ``preprocess``: ``gcn-zca`` (the paper: GCN to L2 norm
    ``gcn_scale``, then ZCA with filter bias ``zca_bias`` fitted on the training split), ``gcn``,
    ``none`` ([-1, 1] pixels). ``augment``: ``none`` (the paper), ``crop`` or ``crop-flip``.
    """
    root = Path(root)
    if source not in CIFAR_SOURCES:
        raise ConfigError(f"unknown CIFAR-10 source {source!r}; choose one of {', '.join(CIFAR_SOURCES)}")
    jpeg = root / JPEG_ARCHIVE
    reader = None
    if source in ("auto", "official"):
        reader = _official_files(root, download=download and (source == "official" or not jpeg.is_file()))
        if reader is None and source == "official":
            raise DataError(f"official CIFAR-10 not found: {root} holds neither {OFFICIAL_FOLDER}/ nor "
                            f"{OFFICIAL_ARCHIVE}; allow downloading or point --data-dir at the folder holding it")
    common = dict(val_size=val_size, preprocess=preprocess, gcn_scale=gcn_scale, zca_bias=zca_bias,
                  augment=augment, cache=cache, num_classes=10)
    if reader is not None:
        fingerprint = _verify_official(reader, verify)
        return build_splits("cifar10", fingerprint, lambda: _decode_official(reader), **common)
    if not jpeg.is_file():
        raise DataError(
            f"CIFAR-10 not found under {root}: put the official {OFFICIAL_ARCHIVE} (or {OFFICIAL_FOLDER}/) or "
            f"{JPEG_ARCHIVE} there, point --data-dir / BINARYCONNECT_DATA at the folder holding it, or allow "
            "downloading"
        )
    digest = file_digest(jpeg, "sha256")
    if verify and digest != JPEG_ARCHIVE_SHA256:
        raise DataError(f"checksum mismatch for {jpeg}: expected sha256 {JPEG_ARCHIVE_SHA256}, got {digest}. "
                        "It is not the CIFAR-10 JPEG copy this project knows.")
    _warn_jpeg()

    def decode_jpeg_copy() -> dict[str, torch.Tensor]:
        tensors, classes = read_image_folder(jpeg)
        if tuple(classes) != CLASSES:
            raise DataError(f"{jpeg} has classes {', '.join(classes)}, not CIFAR-10's")
        return tensors

    return build_splits("cifar10-jpeg", "sha256:" + digest, decode_jpeg_copy, **common)


@register_dataset("imagefolder")
def load_imagefolder(
    root: Path,
    path: str | None = None,
    val_size: int = 5_000,
    download: bool = False,
    preprocess: str = "gcn-zca",
    gcn_scale: float = 55.0,
    zca_bias: float = 0.1,
    augment: str = "none",
    cache: bool = True,
) -> Splits:
    """Any ``{train,test}/<class>/<image>`` tree (folder or tar archive) at ``path`` (relative paths are
    looked up under the data root first), with the preprocessing and augmentation options of CIFAR-10."""
    if path is None:
        raise ConfigError("the imagefolder dataset needs a path: dataset option path=<folder or archive>")
    p = Path(path).expanduser()
    if not p.is_absolute() and (Path(root) / p).exists():
        p = Path(root) / p
    if not p.exists():
        where = "" if p.is_absolute() else f" (looked for under the data root {root} and in {Path.cwd()})"
        raise DataError(f"ImageFolder source {p} not found{where}: give a folder holding train/ and test/, or a tar "
                        "archive of one")

    def decode() -> dict[str, torch.Tensor]:
        tensors, classes = read_image_folder(p)
        return {**tensors, "num_classes": torch.tensor(len(classes))}

    return build_splits("imagefolder", source_fingerprint(p), decode, val_size=val_size, preprocess=preprocess,
                        gcn_scale=gcn_scale, zca_bias=zca_bias, augment=augment, cache=cache)
