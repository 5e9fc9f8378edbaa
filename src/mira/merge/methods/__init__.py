"""Built-in merge methods, one class per module; importing this package registers them all."""
from mira.merge.methods.dare import DareLinearMerge, DareMerge, DareTiesMerge
from mira.merge.methods.linear import LinearMerge
from mira.merge.methods.slerp import SlerpMerge
from mira.merge.methods.task_arithmetic import TaskArithmeticMerge
from mira.merge.methods.ties import TiesMerge

__all__ = ["DareLinearMerge", "DareMerge", "DareTiesMerge", "LinearMerge", "SlerpMerge", "TaskArithmeticMerge",
           "TiesMerge"]
