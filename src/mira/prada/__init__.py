"""Prada: adapt a black-box LLM with a private on-device proxy (Wang, He et al., 2025).

A provider serves a large model and shares only its next-token scores. The device
fine-tunes a small proxy with LoRA on private data; at inference every next-token
distribution of the remote model is corrected by the proxy's logit offset::

    z = z_target + alpha * (z_proxy_with_lora - z_proxy_base)

Modules, in the order they build on each other:

* ``errors``   -- ``PradaError`` and its subclasses (each carries the text generated so far);
* ``protocol`` -- the JSON wire format (pydantic models, base64 float32 score matrices);
* ``server``   -- the provider: a FastAPI app (``mira serve``) with logits and draft endpoints;
* ``client``   -- the device's HTTP client, counting round trips and body bytes;
* ``offset``   -- the logit combination and the proxy pair (one base, adapter on/off);
* ``decoding`` -- ``per-token`` and ``speculative`` decoders, registered by name;
* ``train``    -- LoRA on the proxy from private records through the core trainer;
* ``models``   -- the experiment's target/proxy pair built from stories260K;
* ``cli``      -- ``mira serve`` and ``mira proxy {build-models,train,generate}``.
"""
