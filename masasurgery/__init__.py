"""masasurgery: share the attention projections of PyTorch transformers.

MASA (Matrix Atom Sharing in Attention) writes each projection of ``L`` repeated
blocks as a mixture of ``S`` shared matrices: ``W_l = sum_s c[l, s] * D_s``.
"""

from masasurgery.analyze import Analysis as Analysis
from masasurgery.analyze import analyze as analyze
from masasurgery.budget import Allocation as Allocation
from masasurgery.budget import solve_budget as solve_budget
from masasurgery.calibrate import Calibration as Calibration
from masasurgery.calibrate import InputStatistics as InputStatistics
from masasurgery.calibrate import collect_statistics as collect_statistics
from masasurgery.compress import Compression as Compression
from masasurgery.compress import CompressionPlan as CompressionPlan
from masasurgery.compress import compress as compress
from masasurgery.compress import prepare_compression as prepare_compression
from masasurgery.config import ROLES as ROLES
from masasurgery.config import MasaConfig as MasaConfig
from masasurgery.convert import Conversion as Conversion
from masasurgery.convert import ParameterCount as ParameterCount
from masasurgery.convert import RoleFit as RoleFit
from masasurgery.convert import convert as convert
from masasurgery.distributed import ShardPlan as ShardPlan
from masasurgery.distributed import block_names as block_names
from masasurgery.distributed import shard_converted as shard_converted
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
from masasurgery.fit_data import ErrorTable as ErrorTable
from masasurgery.fit_data import error_table as error_table
from masasurgery.fit_data import fit_calibrated as fit_calibrated
from masasurgery.io import Checkpoint as Checkpoint
from masasurgery.io import load as load
from masasurgery.io import read_checkpoint as read_checkpoint
from masasurgery.io import save as save
from masasurgery.lora import lora_targets as lora_targets
from masasurgery.lora import register_shared_lora as register_shared_lora
from masasurgery.materialize import Materialized as Materialized
from masasurgery.materialize import materialize as materialize
from masasurgery.modules import AtomDictionary as AtomDictionary
from masasurgery.modules import DictionaryStore as DictionaryStore
from masasurgery.modules import SharedConv1D as SharedConv1D
from masasurgery.modules import SharedConv2d as SharedConv2d
from masasurgery.modules import SharedMultiheadAttention as SharedMultiheadAttention
from masasurgery.modules import SharedProjection as SharedProjection
from masasurgery.modules import set_weight_cache as set_weight_cache
from masasurgery.params import TrainableSummary as TrainableSummary
from masasurgery.params import param_groups as param_groups
from masasurgery.params import parameter_kinds as parameter_kinds
from masasurgery.params import set_trainable as set_trainable
from masasurgery.passes.plans import RewritePlan as RewritePlan
from masasurgery.passes.plans import plan_of as plan_of
from masasurgery.passes.plans import rebuild as rebuild
from masasurgery.scratch import InitSummary as InitSummary
from masasurgery.scratch import init_dictionaries as init_dictionaries
from masasurgery.sensitivity import Sensitivity as Sensitivity
from masasurgery.sensitivity import collect_sensitivity as collect_sensitivity
from masasurgery.stabilizer import StabilizerSummary as StabilizerSummary
from masasurgery.stabilizer import add_coefficient_mlp as add_coefficient_mlp
from masasurgery.stabilizer import fold_coefficient_mlp as fold_coefficient_mlp
from masasurgery.tolerances import Tolerance as Tolerance
from masasurgery.tolerances import tolerance_for as tolerance_for
from masasurgery.verify import VerificationReport as VerificationReport
from masasurgery.verify import verify as verify

__version__ = "0.1.0"

__all__ = [
    "ROLES",
    "Allocation",
    "AlreadyConvertedError",
    "Analysis",
    "AtomDictionary",
    "Calibration",
    "CaptureError",
    "Checkpoint",
    "CheckpointError",
    "Compression",
    "CompressionPlan",
    "ConfigError",
    "Conversion",
    "ConversionMismatchError",
    "DictionaryStore",
    "ErrorTable",
    "FitError",
    "InitSummary",
    "InputStatistics",
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
    "Sensitivity",
    "ShardPlan",
    "SharedConv1D",
    "SharedConv2d",
    "SharedMultiheadAttention",
    "SharedProjection",
    "StabilizerSummary",
    "Tolerance",
    "TrainableSummary",
    "VerificationError",
    "VerificationReport",
    "add_coefficient_mlp",
    "analyze",
    "block_names",
    "collect_statistics",
    "collect_sensitivity",
    "compress",
    "convert",
    "error_table",
    "fit_calibrated",
    "fold_coefficient_mlp",
    "init_dictionaries",
    "load",
    "lora_targets",
    "materialize",
    "matrix_pca",
    "param_groups",
    "parameter_kinds",
    "plan_of",
    "prepare_compression",
    "read_checkpoint",
    "rebuild",
    "register_shared_lora",
    "save",
    "set_trainable",
    "set_weight_cache",
    "shard_converted",
    "solve_budget",
    "tolerance_for",
    "verify",
]
