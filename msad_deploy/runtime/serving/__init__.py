"""``msad serve ARTIFACT``: an HTTP detection service on FastAPI + uvicorn (``pip install 'msad-deploy[serve]'``).

Endpoints:

- ``POST /v1/detect``: an image as the request body (JPEG, PNG, ...) or as a multipart upload (the
  first file field) -> ``{"model", "image_size", "detections": [{"box", "score", "class_id",
  "class_name", "category_id"}]}`` (``?score_thresh=0.3`` raises the threshold). ``GET /v1/model``
  describes the model (classes, backend, batching, limits).
- The Open Inference Protocol (KServe v2, what Triton speaks; ``tritonclient.http`` works against it):
  ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``, ``GET /v2/models/NAME`` (metadata),
  ``GET /v2/models/NAME/config`` (Triton's model configuration form), ``GET /v2/models/NAME/ready``,
  ``POST /v2/models/NAME[/versions/1]/infer``. One input ``IMAGE``, ``UINT8``, shape ``[H, W, 3]`` or
  ``[B, H, W, 3]`` RGB (JSON ``data``: integers 0..255 only, or the binary tensor extension); outputs
  ``boxes`` FP32 [B, K, 4] (xyxy, original pixels), ``scores`` FP32 [B, K], ``labels`` INT64 [B, K]
  (-1 padding) and ``num_detections`` INT64 [B], K = the spec's max_detections, as JSON or binary.
- ``GET /metrics``: Prometheus text (requests, errors, latency, batch sizes, inference time; with
  ``--slo-ms``, requests and images per operating point, overload batches, objective misses).

Adaptive resolution (``--slo-ms`` with ``--sizes`` and/or ``--operating-points``): each micro-batch
runs at the most accurate input size whose expected completion, given the queue, meets the
objective (:mod:`.policy`); every response names the size that served it (header
``x-msad-operating-point``, ``operating_point`` in /v1/detect JSON).

Bounded cost per request (:mod:`.options`): the body (``--max-body-mb``), images per request
(``--max-images``, default ``--max-batch``; more is a 413 naming the limit), pixels per image
(``--max-pixels``, by default following the model's input size; 413), concurrent decodes
(``--decode-workers``) and the bodies held at once (``--max-inflight-mb``; more wait unread). Images are decoded reduced to what the model uses (JPEG DCT scaling).
Bad requests get a 4xx with ``{"error": "..."}`` and the server goes on. SIGTERM drains in-flight
requests (at most ``--drain-timeout`` seconds), stops the batcher, releases the model, exits 0.

Modules, by what changes together:

- :mod:`.protocol`: parsing and validating requests, encoding responses (pure functions);
- :mod:`.options`: options and the limits they resolve to for a model;
- :mod:`.decode`: bounded, reduced decoding to checked tensors;
- :mod:`.batcher`: the fair micro-batcher (asks the policy for each batch's size);
- :mod:`.policy`: the operating-point policy (pure: a clock and the queue's arrival times in, a
  size out); :mod:`.points`: operating points from msad bench rows and start-up timing;
- :mod:`.app`: the FastAPI wiring; :mod:`.process`: the ``msad serve`` process (uvicorn, signals).
"""

from msad_deploy.runtime.serving.app import create_app
from msad_deploy.runtime.serving.errors import RequestError
from msad_deploy.runtime.serving.options import Limits, ServeOptions
from msad_deploy.runtime.serving.process import serve

__all__ = ["Limits", "RequestError", "ServeOptions", "create_app", "serve"]
