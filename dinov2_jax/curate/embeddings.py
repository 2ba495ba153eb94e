"""Embedding matrices on disk, read chunk by chunk within a memory budget; index files.

Embeddings are `.npy` files of shape (N, D) (float32; other float dtypes are cast), or a
folder of such shards: the shards listed by its `manifest.json` (what `embed` writes), else
every `*.npy` in it, sorted by name. Rows are numbered across shards in that order. Only the
`.npy` headers are read up front; rows are read on demand with positioned reads (a window of
the file, like a memory map, but without keeping pages mapped, and through `etils.epath`, so
`gs://` works too). Every row read is checked: a non-finite or all-zero row is an error that
names the file and the row. Index files are `.npy` int64 vectors of rows into embeddings.
"""
import dataclasses
import json
from collections.abc import Iterator

import numpy as np
import tqdm
from etils import epath

from dinov2_jax.configs import ConfigError

MANIFEST = "manifest.json"
DEFAULT_MEMORY_BUDGET_MB = 1024
BYTES_PER_FLOAT = 4
# A chunk lives in up to this many host buffers at once: the bytes read, its float32 or
# normalised copy, its zero-padded copy, the device buffer (host memory on CPU), and the next
# chunk being read while the device works on this one.
CHUNK_COPIES = 5
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


@dataclasses.dataclass(frozen=True)
class Shard:
    """One (rows, dim) block of the matrix: a `.npy` file region or an in-memory array."""
    name: str
    rows: int
    dim: int
    dtype: np.dtype
    path: epath.Path | None = None
    data_offset: int = 0
    array: np.ndarray | None = None
    parent: "Embeddings | None" = None
    parent_rows: np.ndarray | None = None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of this shard as float32."""
        if self.array is not None:
            return np.asarray(self.array[start:stop], np.float32)
        if self.parent is not None:
            return self.parent.gather(self.parent_rows[start:stop], max(stop - start, 1))
        row_bytes = self.dim * self.dtype.itemsize
        with self.path.open("rb") as f:
            f.seek(self.data_offset + start * row_bytes)
            data = f.read((stop - start) * row_bytes)
        if len(data) != (stop - start) * row_bytes:
            raise ConfigError(f"{self.name}: file is truncated (rows {start}-{stop - 1} of "
                              f"{self.rows} cannot be read)")
        rows = np.frombuffer(data, self.dtype).reshape(stop - start, self.dim)
        return rows.astype(np.float32, copy=False)


def _npy_header(path: epath.Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a `.npy` file, reading only its header."""
    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran, dtype = read_header(f)
        except ValueError as e:
            raise ConfigError(f"{path}: not a readable .npy file ({e})") from None
        return shape, fortran, dtype, f.tell()


def _file_shard(path: epath.Path) -> Shard:
    shape, fortran, dtype, offset = _npy_header(path)
    if len(shape) != 2:
        raise ConfigError(f"{path}: embeddings must be a 2-D (N, D) array, got shape {shape}")
    if not np.issubdtype(dtype, np.floating):
        raise ConfigError(f"{path}: embeddings must be floating point, got {dtype}")
    if fortran and shape[0] > 1 and shape[1] > 1:
        raise ConfigError(f"{path}: Fortran-ordered arrays are not supported; save it with "
                          f"np.save(path, np.ascontiguousarray(x))")
    return Shard(str(path), shape[0], shape[1], np.dtype(dtype), path=path, data_offset=offset)


def _folder_shards(path: epath.Path) -> tuple[list[epath.Path], list[epath.Path] | None]:
    """(embedding shards, source-index files or None) of a folder (see the module docstring)."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return sorted(path.glob("*.npy")), None
    shards = json.loads(manifest.read_text())["shards"]
    index = [path / shard["index"] for shard in shards if "index" in shard]
    return [path / shard["embeddings"] for shard in shards], index or None


class Embeddings:
    """An (N, D) float32 matrix over shards (see the module docstring)."""

    def __init__(self, shards: list[Shard], name: str, source_index: list | None = None):
        if not shards:
            raise ConfigError(f"{name}: holds no embeddings")
        dim = shards[0].dim
        for shard in shards:
            if shard.dim != dim:
                raise ConfigError(f"{shard.name}: rows have dimension {shard.dim}, but "
                                  f"{shards[0].name} has {dim}")
        self.shards, self.name, self.dim = shards, name, dim
        self.starts = np.cumsum([0] + [shard.rows for shard in shards])
        self.num_rows = int(self.starts[-1])
        self._source_index = source_index

    @classmethod
    def open(cls, path) -> "Embeddings":
        """The embeddings of a `.npy` file or a folder of shards."""
        path = epath.Path(path)
        if not path.exists():
            raise ConfigError(f"embeddings {path} do not exist")
        if not path.is_dir():
            return cls([_file_shard(path)], str(path))
        paths, index = _folder_shards(path)
        if not paths:
            raise ConfigError(f"{path}: holds no .npy embedding shards")
        return cls([_file_shard(p) for p in paths], str(path), index)

    @classmethod
    def from_array(cls, array, name: str) -> "Embeddings":
        """In-memory rows (e.g. a level's centroids) behind the same interface."""
        array = np.asarray(array)
        if array.ndim != 2:
            raise ConfigError(f"{name}: expected a 2-D (N, D) array, got shape {array.shape}")
        return cls([Shard(name, array.shape[0], array.shape[1], array.dtype, array=array)], name)

    def subset(self, rows: np.ndarray, name: str) -> "Embeddings":
        """The given rows (e.g. those dedup kept), read from these embeddings on demand."""
        rows = np.asarray(rows, np.int64)
        return Embeddings([Shard(name, len(rows), self.dim, np.dtype(np.float32), parent=self,
                                 parent_rows=rows)], name)

    def __len__(self) -> int:
        return self.num_rows

    def locate(self, row: int) -> tuple[str, int]:
        """(file name, row within that file) of a global row."""
        shard = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.shards[shard].name, row - int(self.starts[shard])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as one float32 array, checked (see `check_rows`)."""
        stop = min(stop, self.num_rows)
        parts = []
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for shard_id in range(first, len(self.shards)):
            shard_start = int(self.starts[shard_id])
            if shard_start >= stop:
                break
            shard = self.shards[shard_id]
            lo = max(start, shard_start) - shard_start
            hi = min(stop, shard_start + shard.rows) - shard_start
            part = shard.read(lo, hi)
            check_rows(part, shard.name, lo)
            parts.append(part)
        if not parts:
            return np.zeros((0, self.dim), np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def chunks(self, rows_per_chunk: int, progress: bool = False,
               desc: str = "") -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) blocks of at most `rows_per_chunk` rows, in order."""
        bar = tqdm.tqdm(total=self.num_rows, unit="row", desc=desc or self.name,
                        disable=not progress, leave=False)
        for start in range(0, self.num_rows, rows_per_chunk):
            block = self.read(start, start + rows_per_chunk)
            yield start, block
            bar.update(len(block))
        bar.close()

    def gather(self, rows: np.ndarray, rows_per_chunk: int) -> np.ndarray:
        """The given rows (any order, repeats allowed), read in sorted runs of whole chunks."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        position = 0
        while position < len(sorted_rows):
            start = int(sorted_rows[position])
            end = int(np.searchsorted(sorted_rows, start + rows_per_chunk, side="left"))
            block = self.read(start, min(start + rows_per_chunk, self.num_rows))
            out[order[position:end]] = block[sorted_rows[position:end] - start]
            position = end
        return out

    def source_index(self) -> np.ndarray | None:
        """Row -> position in the image source, when `embed` recorded it (skipped images)."""
        if self._source_index is None:
            return None
        return np.concatenate([np.load(p.open("rb")) for p in self._source_index])


def check_rows(rows: np.ndarray, name: str, first_row: int) -> None:
    """Raises ConfigError naming the file and row of the first non-finite or all-zero row."""
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        row = first_row + int(np.argmin(finite))
        raise ConfigError(f"{name}: row {row} holds NaN or infinite values")
    nonzero = rows.any(axis=1)
    if not nonzero.all():
        row = first_row + int(np.argmin(nonzero))
        raise ConfigError(f"{name}: row {row} is all zeros (an image that was never embedded?)")


def rows_within(memory_budget_mb: float, bytes_per_row: float, fixed_bytes: float = 0,
                multiple: int = 1, what: str = "") -> int:
    """How many rows of `bytes_per_row` fit the budget besides `fixed_bytes`, a multiple of
    `multiple` (the device count); ConfigError when not even `multiple` rows fit."""
    free = memory_budget_mb * 2**20 - fixed_bytes
    rows = int(free // bytes_per_row) // multiple * multiple
    if rows < multiple:
        need = (fixed_bytes + multiple * bytes_per_row) / 2**20
        raise ConfigError(f"--memory_budget_mb={memory_budget_mb} is too small{what}: it needs at "
                          f"least {need:.1f} MB")
    return rows


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); rows are nonzero (checked on read)."""
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32, copy=False)


def load_indices(path, num_rows: int, what: str = "indices") -> np.ndarray:
    """An int64 index vector from a `.npy` file, every entry checked to lie in [0, num_rows)."""
    path = epath.Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    with path.open("rb") as f:
        indices = np.load(f)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ConfigError(f"{path}: {what} must be a 1-D integer array, got {indices.dtype} "
                          f"{indices.shape}")
    bad = (indices < 0) | (indices >= num_rows)
    if bad.any():
        row = int(np.argmax(bad))
        raise ConfigError(f"{path}: row {row} holds index {int(indices[row])}, outside "
                          f"[0, {num_rows})")
    return indices.astype(np.int64)


def save_array(path, array: np.ndarray) -> None:
    """np.save through epath, atomically: a killed writer leaves no partial file under `path`."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial"
    with partial.open("wb") as f:
        np.save(f, np.asarray(array))
    partial.replace(path)


def save_json(path, value) -> None:
    """JSON through epath, atomically (see `save_array`)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial"
    partial.write_text(json.dumps(value, indent=1))
    partial.replace(path)


def load_array(path) -> np.ndarray:
    """A whole `.npy` file through epath (for outputs of this package: centroids, labels)."""
    path = epath.Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    with path.open("rb") as f:
        return np.load(f)
