"""The stage graph: every stage, in the order users see them."""

from __future__ import annotations

from irmprobe.pipeline.stage import Stage
from irmprobe.pipeline.stages.ablate import AblateStage  # noqa: E402
from irmprobe.pipeline.stages.attribute import AttributeStage
from irmprobe.pipeline.stages.capture import CaptureStage
from irmprobe.pipeline.stages.compare import CompareStage  # noqa: E402
from irmprobe.pipeline.stages.dashboard import DashboardStage
from irmprobe.pipeline.stages.depth import DepthStage
from irmprobe.pipeline.stages.discover import DiscoverStage  # noqa: E402
from irmprobe.pipeline.stages.fit import FitStage  # noqa: E402
from irmprobe.pipeline.stages.interpret import InterpretStage  # noqa: E402
from irmprobe.pipeline.stages.layers import LayersStage
from irmprobe.pipeline.stages.organism import OrganismStage
from irmprobe.pipeline.stages.report import ReportStage  # noqa: E402
from irmprobe.pipeline.stages.saes import SAEStage  # noqa: E402
from irmprobe.pipeline.stages.samples import SamplesStage
from irmprobe.pipeline.stages.seeds import SeedsStage

GRAPH: list[Stage] = [OrganismStage(), SamplesStage(), LayersStage(), DepthStage(), CaptureStage(), SAEStage(),
                      FitStage(), CompareStage(), DiscoverStage(), AttributeStage(), SeedsStage(), InterpretStage(),
                      AblateStage(), DashboardStage(), ReportStage()]
"""Every stage, in the order users see them. ``--force STAGE`` re-runs it and every stage that needs it."""


STAGES = tuple(s.name for s in GRAPH)
