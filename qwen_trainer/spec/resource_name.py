"""The Kubernetes identity of the QwenTrainingJob resource, shared by the operator (CRD, handlers) and the trainer
(which patches its resource's status)."""

GROUP = "training.qwen.dev"
VERSION = "v1alpha1"
KIND = "QwenTrainingJob"
PLURAL = "qwentrainingjobs"
SINGULAR = "qwentrainingjob"
SHORT_NAMES = ["qtj"]
API_VERSION = f"{GROUP}/{VERSION}"
