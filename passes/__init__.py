"""Graph passes: capture a model, find its attention, group blocks, rewrite.

Installed as ``masasurgery.passes``.
"""

from masasurgery.passes.capture import Capture as Capture
from masasurgery.passes.capture import Inputs as Inputs
from masasurgery.passes.capture import capture as capture
from masasurgery.passes.find_attention import AttentionSite as AttentionSite
from masasurgery.passes.find_attention import Findings as Findings
from masasurgery.passes.find_attention import Projection as Projection
from masasurgery.passes.find_attention import SkippedSite as SkippedSite
from masasurgery.passes.find_attention import find_attention as find_attention
from masasurgery.passes.group import Group as Group
from masasurgery.passes.group import Grouping as Grouping
from masasurgery.passes.group import group_sites as group_sites
from masasurgery.passes.rewrite import Rewrite as Rewrite
from masasurgery.passes.rewrite import restore as restore
from masasurgery.passes.rewrite import rewrite as rewrite
from masasurgery.passes.structure import find_by_structure as find_by_structure

__all__ = [
    "AttentionSite",
    "Capture",
    "Findings",
    "Group",
    "Grouping",
    "Inputs",
    "Projection",
    "Rewrite",
    "SkippedSite",
    "capture",
    "find_attention",
    "find_by_structure",
    "group_sites",
    "restore",
    "rewrite",
]
