"""The stage graph: a Stage protocol (:mod:`.stage`), one runner (:mod:`.runner`), the stages
(:mod:`.stages`) and the control branch (:mod:`.control`)."""

from irmprobe.api import FittedIRM, RunResult, run
from irmprobe.pipeline.stages import GRAPH, STAGES

__all__ = ["GRAPH", "STAGES", "FittedIRM", "RunResult", "run"]
