"""An application instrumented with the OpenTelemetry SDK: one CLIENT span
around one HTTP GET, its context injected as W3C `traceparent`, exported
over OTLP/gRPC. Prints the trace id and the answer's status and body.

usage: traced_client.py --url URL --otlp http://ADDR:PORT [--count N]
"""

import argparse
import urllib.request

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--otlp", required=True)
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    provider = TracerProvider(resource=Resource.create({"service.name": "traced-client"}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=args.otlp, insecure=True))
    )
    tracer = provider.get_tracer("meshd-tests")
    for _ in range(args.count):
        with tracer.start_as_current_span("GET", kind=trace.SpanKind.CLIENT) as span:
            headers = {}
            propagate.inject(headers)
            request = urllib.request.Request(args.url, headers=headers)
            with urllib.request.urlopen(request, timeout=10) as answer:
                body = answer.read().decode(errors="replace").strip()
                status = answer.status
            trace_id = format(span.get_span_context().trace_id, "032x")
            print(f"trace {trace_id} status {status} {body}", flush=True)
    provider.shutdown()


if __name__ == "__main__":
    main()
