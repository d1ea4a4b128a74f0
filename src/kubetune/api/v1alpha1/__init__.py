"""kubetune.io/v1alpha1: FineTuneJob and ModelDeployment."""

from kubetune.api.v1alpha1.finetunejob import FineTuneJob, FineTuneJobSpec
from kubetune.api.v1alpha1.modeldeployment import ModelDeployment, ModelDeploymentSpec
from kubetune.api.v1alpha1.status import FineTuneJobStatus

__all__ = [
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ModelDeployment",
    "ModelDeploymentSpec",
]
