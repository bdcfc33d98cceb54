"""An OTLP trace receiver built from the official OpenTelemetry protobuf
definitions (opentelemetry-proto): OTLP/gRPC TraceService on one port and
OTLP/HTTP protobuf (POST /v1/traces) on another. Every span received is
appended to a file as one JSON line, for the tests to read.

usage: otlp_receiver.py --grpc ADDR:PORT --http ADDR:PORT --out FILE
"""

import argparse
import json
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

lock = threading.Lock()


def record(out, request, protocol):
    lines = []
    for resource_spans in request.resource_spans:
        resource = {
            kv.key: kv.value.string_value
            for kv in resource_spans.resource.attributes
        }
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attributes = {}
                for kv in span.attributes:
                    value = kv.value
                    kind = value.WhichOneof("value")
                    attributes[kv.key] = getattr(value, kind) if kind else None
                lines.append(
                    json.dumps(
                        {
                            "protocol": protocol,
                            "service": resource.get("service.name", ""),
                            "resource": resource,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": span.kind,
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "status": span.status.code,
                            "attributes": attributes,
                        }
                    )
                )
    with lock:
        with open(out, "a") as f:
            for line in lines:
                f.write(line + "\n")


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out

    def Export(self, request, context):
        record(self.out, request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


def http_handler(out):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            length = int(self.headers.get("content-length", "0"))
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(self.rfile.read(length))
            record(out, request, "http")
            body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
        TraceService(args.out), server
    )
    server.add_insecure_port(args.grpc)
    server.start()
    host, port = args.http.rsplit(":", 1)
    http = ThreadingHTTPServer((host, int(port)), http_handler(args.out))
    print("listening", args.grpc, args.http, flush=True)
    http.serve_forever()


if __name__ == "__main__":
    main()
