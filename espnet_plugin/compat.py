"""The one place that knows where ESPnet keeps its legacy ``nets`` package.

espnet <= 202511 ships it as ``espnet.nets``; espnet 202611 (Python >= 3.12) moved it to
``espnet2.legacy.nets``. Everything else in the plugin imports those names from here.
"""

import importlib
from types import ModuleType

_NETS_ROOTS = ("espnet2.legacy.nets", "espnet.nets")


def nets_module(submodule: str) -> ModuleType:
    """Import ``<nets root>.<submodule>`` from whichever root this espnet provides."""
    for root in _NETS_ROOTS:
        name = f"{root}.{submodule}"
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            # Only "this root does not exist" moves on; a missing dependency inside it is real.
            if err.name is None or not name.startswith(err.name):
                raise
    raise ModuleNotFoundError(
        f"ESPnet's nets package has no '{submodule}' under any of {', '.join(_NETS_ROOTS)}; "
        "is espnet installed?"
    )


_nets_utils = nets_module("pytorch_backend.nets_utils")
make_pad_mask = _nets_utils.make_pad_mask
make_non_pad_mask = _nets_utils.make_non_pad_mask

BatchScorerInterface = nets_module("scorer_interface").BatchScorerInterface

_transformer = "pytorch_backend.transformer."
LayerNorm = nets_module(_transformer + "layer_norm").LayerNorm
PositionalEncoding = nets_module(_transformer + "embedding").PositionalEncoding
PositionwiseFeedForward = nets_module(
    _transformer + "positionwise_feed_forward"
).PositionwiseFeedForward

_subsampling = nets_module(_transformer + "subsampling")
Conv2dSubsampling = _subsampling.Conv2dSubsampling
Conv2dSubsampling2 = _subsampling.Conv2dSubsampling2
Conv2dSubsampling6 = _subsampling.Conv2dSubsampling6
Conv2dSubsampling8 = _subsampling.Conv2dSubsampling8
TooShortUttError = _subsampling.TooShortUttError
check_short_utt = _subsampling.check_short_utt

BatchBeamSearch = nets_module("batch_beam_search").BatchBeamSearch
CTCPrefixScorer = nets_module("scorers.ctc").CTCPrefixScorer
Hypothesis = nets_module("beam_search").Hypothesis
end_detect = nets_module("e2e_asr_common").end_detect
