"""A request's sampling fields over the checkpoint's generation_config.json -> SamplingParams and stop strings.

Defaults are what generation_config.json sets, as vLLM's `--generation-config auto` takes them: temperature,
top_k, top_p, repetition_penalty, max_new_tokens; `do_sample: false` there makes greedy the default. A field the
file does not set is off (temperature 1, top_k 0, top_p 1, penalty 1); max_tokens defaults to 2048, the
reference's mm_infer value and `omni-fast infer`'s --max_new_tokens. So a request with temperature 0 and no
other field decodes as `omni-fast infer` does: greedy, the file's repetition penalty, its EOS ids.
"""
from __future__ import annotations

from dataclasses import dataclass

from omni_fast.config import ConfigError, SamplingParams
from omni_fast.serve.protocol import ChatRequest, ServeError

DEFAULT_MAX_TOKENS = 2048  # the reference's mm_infer max_new_tokens
MAX_STOP_STRINGS = 16  # each is searched for in every new piece of text


@dataclass(slots=True)
class SamplingDefaults:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    max_tokens: int = DEFAULT_MAX_TOKENS  # new tokens per completion

    @classmethod
    def from_generation_config(cls, config) -> SamplingDefaults:
        """transformers' GenerationConfig of the checkpoint (None: no generation_config.json) -> the defaults,
        from the fields the file sets only (GenerationConfig fills the others with HF's own defaults)."""
        set_ = config.to_diff_dict() if config is not None else {}
        out = cls()
        if "temperature" in set_ and set_["temperature"] is not None:
            out.temperature = float(set_["temperature"])
        if set_.get("do_sample") is False:
            out.temperature = 0.0
        if set_.get("top_k") is not None:
            out.top_k = int(set_["top_k"])
        if set_.get("top_p") is not None:
            out.top_p = float(set_["top_p"])
        if set_.get("repetition_penalty") is not None:
            out.repetition_penalty = float(set_["repetition_penalty"])
        if set_.get("max_new_tokens") is not None:
            out.max_tokens = int(set_["max_new_tokens"])
        return out


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in stops):
        raise ServeError(400, "stop: an empty string never matches; give non-empty strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ServeError(400, f"stop: {len(stops)} strings; at most {MAX_STOP_STRINGS}", "stop")
    return stops


def sampling_params(request: ChatRequest, defaults: SamplingDefaults) -> tuple[SamplingParams, tuple[str, ...]]:
    """-> (SamplingParams for the engine, the stop strings the server applies to the text), or a 400."""
    if request.top_logprobs:
        raise ServeError(400, "top_logprobs: only 0 is supported (the engine returns the sampled token's "
                              "log-probability, not the most likely alternatives)", "top_logprobs")
    if request.top_logprobs is not None and not request.logprobs:
        raise ServeError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
    top_k = request.top_k if request.top_k is not None else defaults.top_k
    max_tokens = request.max_completion_tokens or request.max_tokens or defaults.max_tokens
    try:
        params = SamplingParams(
            n=request.n, max_tokens=max_tokens, seed=request.seed, top_k=max(top_k, 0), ignore_eos=request.ignore_eos,
            temperature=request.temperature if request.temperature is not None else defaults.temperature,
            top_p=request.top_p if request.top_p is not None else defaults.top_p,
            repetition_penalty=(request.repetition_penalty if request.repetition_penalty is not None
                                else defaults.repetition_penalty))
    except ConfigError as e:
        raise ServeError(400, str(e).replace("SamplingParams.", "")) from None
    return params, _stops(request.stop)
