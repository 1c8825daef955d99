"""MIRROR-LLaVA (SPEC part B): a counselling VLM fine-tuned on MIRROR's dialogues, as four parts.

- ``data``  — ``python -m jobs mirror-llava-data``: training records from a MIRROR run;
- ``train`` — ``python -m jobs mirror-llava-train``: LoRA fine-tuning on Ray Train;
- ``serve`` — ``python -m jobs mirror-llava-serve``: the counselling services on Ray Serve
  (``serve_config``, ``serve_schemas``, ``serve_middleware``, ``serve_backends``, ``serve_ingress``);
- ``infer`` — ``python -m jobs mirror-llava-infer``: simulated counselling sessions through them.
"""
