"""The reference texture memory (section 3.3, Algorithm 1): building, farthest point sampling, top-K retrieval.
No model imports: usable outside BasicSR with any autoencoder that has ``encode``/``decode``."""
from .build import build_rtm_from_options, check_rtm_options
from .candidates import CandidateReport, collect_candidates
from .fps import covering_radius, farthest_point_sampling, fps_space
from .index import KeyIndex, faiss_available
from .memory import ReferenceTextureMemory, autoencoder_identity, build_retriever
from .preview import rtm_preview
from .texture_classifier import LatentTextureDescriptor, TorchvisionTextureClassifier, build_texture_classifier

__all__ = ['build_rtm_from_options', 'check_rtm_options', 'CandidateReport', 'collect_candidates', 'covering_radius',
           'farthest_point_sampling', 'fps_space', 'KeyIndex', 'faiss_available', 'ReferenceTextureMemory',
           'autoencoder_identity', 'build_retriever', 'rtm_preview', 'LatentTextureDescriptor',
           'TorchvisionTextureClassifier', 'build_texture_classifier']
