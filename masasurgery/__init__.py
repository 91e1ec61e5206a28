"""masasurgery: share the attention projections of PyTorch transformers.

MASA (Matrix Atom Sharing in Attention) writes each projection of ``L`` repeated
blocks as a mixture of ``S`` shared matrices: ``W_l = sum_s c[l, s] * D_s``.
"""

from masasurgery.analyze import Analysis as Analysis
from masasurgery.analyze import analyze as analyze
from masasurgery.config import ROLES as ROLES
from masasurgery.config import MasaConfig as MasaConfig
from masasurgery.convert import Conversion as Conversion
from masasurgery.convert import ParameterCount as ParameterCount
from masasurgery.convert import RoleFit as RoleFit
from masasurgery.convert import convert as convert
from masasurgery.errors import AlreadyConvertedError as AlreadyConvertedError
from masasurgery.errors import CaptureError as CaptureError
from masasurgery.errors import CheckpointError as CheckpointError
from masasurgery.errors import ConfigError as ConfigError
from masasurgery.errors import ConversionMismatchError as ConversionMismatchError
from masasurgery.errors import FitError as FitError
from masasurgery.errors import LayoutError as LayoutError
from masasurgery.errors import MasaError as MasaError
from masasurgery.errors import MasaWarning as MasaWarning
from masasurgery.errors import ModelRunError as ModelRunError
from masasurgery.errors import NoAttentionError as NoAttentionError
from masasurgery.errors import VerificationError as VerificationError
from masasurgery.fit import MatrixPCA as MatrixPCA
from masasurgery.fit import matrix_pca as matrix_pca
from masasurgery.io import Checkpoint as Checkpoint
from masasurgery.io import load as load
from masasurgery.io import read_checkpoint as read_checkpoint
from masasurgery.io import save as save
from masasurgery.materialize import Materialized as Materialized
from masasurgery.materialize import materialize as materialize
from masasurgery.modules import AtomDictionary as AtomDictionary
from masasurgery.modules import DictionaryStore as DictionaryStore
from masasurgery.modules import SharedConv1D as SharedConv1D
from masasurgery.modules import SharedConv2d as SharedConv2d
from masasurgery.modules import SharedMultiheadAttention as SharedMultiheadAttention
from masasurgery.modules import SharedProjection as SharedProjection
from masasurgery.modules import set_weight_cache as set_weight_cache
from masasurgery.passes.rewrite import RewritePlan as RewritePlan
from masasurgery.passes.rewrite import plan_of as plan_of
from masasurgery.passes.rewrite import rebuild as rebuild
from masasurgery.tolerances import Tolerance as Tolerance
from masasurgery.tolerances import tolerance_for as tolerance_for
from masasurgery.verify import VerificationReport as VerificationReport
from masasurgery.verify import verify as verify

__version__ = "0.1.0"

__all__ = [
    "ROLES",
    "AlreadyConvertedError",
    "Analysis",
    "AtomDictionary",
    "CaptureError",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "Conversion",
    "ConversionMismatchError",
    "DictionaryStore",
    "FitError",
    "LayoutError",
    "MasaConfig",
    "MasaError",
    "MasaWarning",
    "Materialized",
    "MatrixPCA",
    "ModelRunError",
    "NoAttentionError",
    "ParameterCount",
    "RewritePlan",
    "RoleFit",
    "SharedConv1D",
    "SharedConv2d",
    "SharedMultiheadAttention",
    "SharedProjection",
    "Tolerance",
    "VerificationError",
    "VerificationReport",
    "analyze",
    "convert",
    "load",
    "materialize",
    "matrix_pca",
    "plan_of",
    "read_checkpoint",
    "rebuild",
    "save",
    "set_weight_cache",
    "tolerance_for",
    "verify",
]
