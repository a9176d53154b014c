"""mPLUG (Li et al., 2022) for Hugging Face transformers.

Importing the package registers `"mplug"` with `AutoConfig`, `AutoModel`, `AutoTokenizer`, `AutoImageProcessor` and
`AutoProcessor`, and adds its pipelines (see `transformers_mplug.pipelines`).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForPreTraining,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_mplug import MPLUGConfig
from .generation_mplug import DECODING_MODES, MPLUGBeamSearchOutput, gnmt_length_penalty, original_beam_search
from .image_processing_mplug import MPLUGImageProcessor
from .modeling_mplug import (
    MPLUGAnswerRankingOutput,
    MPLUGDecoderOutput,
    MPLUGForCaptioning,
    MPLUGForGrounding,
    MPLUGForPreTraining,
    MPLUGForQuestionAnswering,
    MPLUGForRetrieval,
    MPLUGForVisualEntailment,
    MPLUGForVisualReasoning,
    MPLUGImageTextClassifierOutput,
    MPLUGModel,
    MPLUGModelOutput,
    MPLUGPreTrainedModel,
    MPLUGPreTrainingOutput,
)
from .pipelines import (
    MPLUGImageCaptioningPipeline,
    MPLUGVisualGroundingPipeline,
    MPLUGVisualQuestionAnsweringPipeline,
    MPLUGZeroShotImageClassificationPipeline,
    register_pipelines,
)
from .processing_mplug import MPLUGProcessor
from .retrieval_index import MPLUGIndexSearchOutput, MPLUGRetrievalIndex
from .tokenization_mplug import MPLUGTokenizer
from .training import MPLUGMomentumCallback, original_hypothesis_scores, self_critical_loss
from .video_utils import sample_frame_indices, sample_video_frames

__version__ = "0.1.0"

AutoConfig.register("mplug", MPLUGConfig, exist_ok=True)
AutoModel.register(MPLUGConfig, MPLUGModel, exist_ok=True)
AutoModelForPreTraining.register(MPLUGConfig, MPLUGForPreTraining, exist_ok=True)
AutoImageProcessor.register(MPLUGConfig, slow_image_processor_class=MPLUGImageProcessor, exist_ok=True)
AutoTokenizer.register(MPLUGConfig, fast_tokenizer_class=MPLUGTokenizer, exist_ok=True)
AutoProcessor.register(MPLUGConfig, MPLUGProcessor, exist_ok=True)
register_pipelines()


_REMOTE_AUTO_CLASSES = {
    "MPLUGModel": "AutoModel",
    "MPLUGForQuestionAnswering": "AutoModelForVisualQuestionAnswering",
    "MPLUGForCaptioning": "AutoModelForImageTextToText",
    "MPLUGForRetrieval": "AutoModelForZeroShotImageClassification",
    "MPLUGForVisualEntailment": "AutoModel",
    "MPLUGForVisualReasoning": "AutoModel",
    "MPLUGForGrounding": "AutoModel",
    "MPLUGForPreTraining": "AutoModelForPreTraining",
}


def register_remote_code(model_class: type = MPLUGModel) -> None:
    """Make `save_pretrained` copy this package's code into saved folders, so that they load with
    `Auto*.from_pretrained(folder, trust_remote_code=True)` in a process that never imports `transformers_mplug`
    (`model_class` is registered for its auto class: `AutoModelForVisualQuestionAnswering` for
    `MPLUGForQuestionAnswering`, `AutoModelForImageTextToText` for the captioner, ...).

    Example:
        >>> import transformers_mplug
        >>> transformers_mplug.register_remote_code()  # then model.save_pretrained(...), processor.save_pretrained(...)
    """
    if model_class.__name__ not in _REMOTE_AUTO_CLASSES:
        raise ValueError(f"`model_class` must be one of {sorted(_REMOTE_AUTO_CLASSES)}, got {model_class.__name__}.")
    MPLUGConfig.register_for_auto_class()
    model_class.register_for_auto_class(_REMOTE_AUTO_CLASSES[model_class.__name__])
    MPLUGImageProcessor.register_for_auto_class("AutoImageProcessor")
    MPLUGTokenizer.register_for_auto_class("AutoTokenizer")
    MPLUGProcessor.register_for_auto_class("AutoProcessor")


__all__ = [
    "register_remote_code",
    "register_pipelines",
    "self_critical_loss",
    "original_hypothesis_scores",
    "original_beam_search",
    "gnmt_length_penalty",
    "DECODING_MODES",
    "MPLUGBeamSearchOutput",
    "sample_frame_indices",
    "sample_video_frames",
    "MPLUGImageCaptioningPipeline",
    "MPLUGVisualGroundingPipeline",
    "MPLUGVisualQuestionAnsweringPipeline",
    "MPLUGZeroShotImageClassificationPipeline",
    "MPLUGAnswerRankingOutput",
    "MPLUGConfig",
    "MPLUGDecoderOutput",
    "MPLUGForCaptioning",
    "MPLUGForGrounding",
    "MPLUGForPreTraining",
    "MPLUGForQuestionAnswering",
    "MPLUGMomentumCallback",
    "MPLUGForRetrieval",
    "MPLUGForVisualEntailment",
    "MPLUGForVisualReasoning",
    "MPLUGImageTextClassifierOutput",
    "MPLUGImageProcessor",
    "MPLUGModel",
    "MPLUGModelOutput",
    "MPLUGPreTrainedModel",
    "MPLUGPreTrainingOutput",
    "MPLUGProcessor",
    "MPLUGRetrievalIndex",
    "MPLUGIndexSearchOutput",
    "MPLUGTokenizer",
]
