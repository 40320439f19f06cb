"""Top-K search by inner product over L2-normalised keys (cosine similarity), with two back ends.

* ``faiss``: an exact ``IndexFlatIP``; on a GPU index when the queries are on CUDA and faiss was built
  with GPU support (``pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12``: both install the one ``faiss``
  package, so it replaces faiss-cpu) and sees a GPU, else on the CPU.
* ``torch``: ``queries @ keys.T`` and ``topk``, in blocks of queries, on the queries' device.

``auto`` (the default) takes faiss for CPU queries when it is installed and torch for queries on a GPU: there
one matmul and a top-K over a few thousand keys is a single kernel pair, while the faiss path passes NumPy
arrays, i.e. copies the queries to the host and the results back, even to a GPU index. ``faiss`` with CUDA
queries uses a GPU index when faiss was built with GPU support and sees a GPU, else the CPU index. Both are exact,
so they return the same indices; scores agree to float32 rounding.
Results come back on the queries' device, sorted by decreasing similarity.
"""
import torch

from patchscaler.utils.errors import ConfigError, InputError

BACKENDS = ('auto', 'faiss', 'torch')


def faiss_available(gpu=False):
    try:
        import faiss
    except ImportError:
        return False
    if not gpu:
        return True
    return hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0


class KeyIndex:
    """Exact top-K inner-product search over fixed keys.

    Args:
        keys (Tensor): (S, D) L2-normalised keys.
        backend (str): ``auto``, ``faiss`` or ``torch``.
        block_size (int): queries per matmul block of the torch back end.
    """

    def __init__(self, keys, backend='auto', block_size=4096):
        if backend not in BACKENDS:
            raise ConfigError(f'retrieval backend must be one of {BACKENDS}, got {backend!r}')
        if backend == 'faiss' and not faiss_available():
            raise ConfigError("retrieval backend 'faiss' asked for but faiss is not installed (pip install faiss-cpu)")
        self.keys = keys.float().contiguous()
        self.backend, self.block_size = backend, int(block_size)
        self._faiss = {}  # 'cpu' / 'cuda:i' -> index, built on first use
        self._keys_on = {self.keys.device: self.keys}  # the keys on each device queries came from
        self._gpu_resources = {}  # kept alive as long as their GPU indexes

    def __len__(self):
        return self.keys.shape[0]

    def backend_for(self, device):
        """The back end that serves queries on ``device``."""
        if self.backend != 'auto':
            return self.backend
        return 'faiss' if device.type == 'cpu' and faiss_available() else 'torch'

    def search(self, queries, k):
        """(M, D) queries (any float dtype, L2-normalised) -> (scores (M, k) float32, indices (M, k) int64)."""
        if queries.dim() != 2 or queries.shape[1] != self.keys.shape[1]:
            raise InputError(f'queries must be (M, {self.keys.shape[1]}), got {tuple(queries.shape)}')
        if not 1 <= int(k) <= len(self):
            raise ConfigError(f'top_k must be between 1 and the RTM size {len(self)}, got {k}')
        k = int(k)
        if queries.shape[0] == 0:
            return queries.new_zeros(0, k, dtype=torch.float32), torch.zeros(0, k, dtype=torch.long,
                                                                              device=queries.device)
        if not torch.isfinite(queries).all():
            raise InputError('retrieval queries contain NaN or inf (a NaN latent patch?)')
        if self.backend_for(queries.device) == 'faiss':
            return self._search_faiss(queries, k)
        return self._search_torch(queries, k)

    def _search_torch(self, queries, k):
        keys = self._keys_on.get(queries.device)
        if keys is None:  # copied to a device once, not per call
            keys = self._keys_on[queries.device] = self.keys.to(queries.device)
        scores, indices = [], []
        for i in range(0, queries.shape[0], self.block_size):
            s, idx = torch.topk(queries[i:i + self.block_size].float() @ keys.T, k, dim=1)
            scores.append(s)
            indices.append(idx)
        return torch.cat(scores), torch.cat(indices)

    def _faiss_index(self, device):
        """A GPU index for CUDA queries when faiss can make one, otherwise the CPU index."""
        import faiss
        if device.type == 'cuda' and not faiss_available(gpu=True):
            device = torch.device('cpu')  # faiss-cpu with CUDA queries (backend: faiss): search on the CPU
        name = str(device)
        if name not in self._faiss:
            index = faiss.IndexFlatIP(self.keys.shape[1])
            index.add(self.keys.cpu().numpy())
            if device.type == 'cuda':
                res = self._gpu_resources[name] = faiss.StandardGpuResources()
                gpu = device.index if device.index is not None else torch.cuda.current_device()
                index = faiss.index_cpu_to_gpu(res, gpu, index)
            self._faiss[name] = index
        return self._faiss[name]

    def _search_faiss(self, queries, k):
        index = self._faiss_index(queries.device)
        scores, indices = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return (torch.from_numpy(scores).to(queries.device),
                torch.from_numpy(indices).to(device=queries.device, dtype=torch.long))
