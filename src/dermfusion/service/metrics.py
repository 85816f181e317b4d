"""Prometheus metrics, on a registry per app (several apps in one process never collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ENDPOINTS = ("/v1/analyze", "/v1/model", "/v1/model-card", "/v1/model-card.html", "/healthz", "/readyz", "/metrics",
             "/", "/docs", "/openapi.json", "/v1/feedback", "/v1/performance", "/v1/admin/promote",
             "/v1/admin/rollback", "/v1/admin/shadow", "/v1/admin/registry")


def endpoint_label(path: str) -> str:
    """Bounded label values: known endpoints, /static, or "other"."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/static/"):
        return "/static"
    if path.startswith("/docs/"):
        return "/docs"
    return "other"


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram("dermfusion_request_latency_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.requests = Counter("dermfusion_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.inference = Histogram("dermfusion_inference_seconds", "model + explanation time per analysis",
                                   buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.queue_wait = Histogram("dermfusion_queue_wait_seconds", "time an analysis waited for a worker",
                                    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.predictions = Counter("dermfusion_predictions_total", "primary diagnosis per analysis", ["class"],
                                   registry=r)
        self.actions = Counter("dermfusion_actions_total", "recommended action per analysis", ["action"], registry=r)
        self.analyses = Counter("dermfusion_analyses_total", "analyses answered (every action, cannot_assess "
                                "included): the denominator of the clinical rates", registry=r)
        self.low_confidence = Counter("dermfusion_low_confidence_total", "assessable analyses whose top calibrated "
                                      "probability is below uncertainty.min_top_probability", registry=r)
        self.low_confidence_cut = Gauge("dermfusion_low_confidence_threshold", "uncertainty.min_top_probability: "
                                        "the cut behind dermfusion_low_confidence_total", registry=r)
        self.reviews = Counter("dermfusion_review_recommended_total", "analyses flagged for human review", registry=r)
        self.confidence = Histogram("dermfusion_prediction_confidence", "top calibrated probability",
                                    buckets=tuple(i / 10 for i in range(1, 11)), registry=r)
        self.risk = Histogram("dermfusion_risk_score", "risk score (0-100)",
                              buckets=(5, 10, 15, 20, 30, 40, 50, 60, 80, 100), registry=r)
        self.rejected = Counter("dermfusion_rejected_total", "requests refused, by error code", ["code"], registry=r)
        self.cannot_assess = Counter("dermfusion_cannot_assess_total", "analyses answered 'cannot assess', by reason "
                                     "(evaluation.quality_gate.REASONS)", ["reason"], registry=r)
        self.in_flight = Gauge("dermfusion_analyses_in_flight", "analyses running or queued", registry=r)
        self.drift = Gauge("dermfusion_input_drift_psi", "population stability index vs the bundle reference",
                           ["signal"], registry=r)
        self.drift_window = Gauge("dermfusion_drift_window_size", "analyses in the drift window", registry=r)
        self.case_mix = Gauge("dermfusion_case_mix_estimate", "class prior of recent traffic, estimated by EM from the "
                              "posteriors (no labels needed)", ["class"], registry=r)
        self.case_mix_shift = Gauge("dermfusion_case_mix_shift", "total-variation distance between the estimated case "
                                    "mix of recent traffic and the bundle's training prior (0 = same mix)", registry=r)
        self.case_mix_window = Gauge("dermfusion_case_mix_window_size", "analyses in the case-mix window", registry=r)
        self.expected_rate = Gauge("dermfusion_expected_rate", "referral / urgent share the operating point in force "
                                   "gives on the bundle's out-of-fold lesions (under the deployment prior when set): "
                                   "what the live rates should be if the clinic's lesions are like those", ["rate"],
                                   registry=r)
        self.model_info = Gauge("dermfusion_model_info", "the loaded model (value 1)",
                                ["name", "version", "hash", "task"], registry=r)
        self.ready = Gauge("dermfusion_ready", "1 when the model is loaded and warmed", registry=r)
        self.audit_writable = Gauge("dermfusion_audit_writable", "1 when the audit store took the last probe write "
                                    "(/readyz)", registry=r)
        self.backend = Gauge("dermfusion_backend", "inference backend of each network member (value 1)",
                             ["member", "backend"], registry=r)
        self.backend_failures = Gauge("dermfusion_backend_failures", "fast backends that failed to build or run "
                                      "at start-up, per network member (it runs on a slower one)", ["member"],
                                      registry=r)
        self.registry_version = Gauge("dermfusion_registry_version", "registry versions loaded: promoted (1), shadow (1) "
                                      "or canary (its share)", ["version", "role"], registry=r)
        self.answers = Counter("dermfusion_answers_total", "analyses answered, by registry version and role "
                               "(promoted | canary; 'none' without a registry)", ["version", "role"], registry=r)
        self.unreturned = Counter("dermfusion_unreturned_predictions_total", "predictions made and audited but not "
                                  "returned (shadow; the promoted one under a canary), by version and outcome",
                                  ["version", "outcome"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
