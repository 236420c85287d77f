"""gRPC server interceptors of the GenerationService: refuse calls while draining, and undecodable request bodies."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

SERVICE_NAME = "fmaas.GenerationService"
DRAINING_MESSAGE = "Server is shutting down"


def _rebuild(handler, behavior, request_deserializer=None):
    """`handler` with another behavior (and deserializer), same streaming kind and serializers."""
    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(behavior, request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer)


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """While draining, every new GenerationService call is refused with UNAVAILABLE (health checks still work)."""

    def __init__(self, draining: Callable[[], bool]) -> None:
        self.draining = draining

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self.draining() or not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler

        async def refuse(_request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)

        return _rebuild(handler, refuse)


class Undecodable:
    """Stands in for a request body that is not a valid protobuf message of the method's type."""

    def __init__(self, method: str, error: DecodeError) -> None:
        self.message = f"request body is not a valid {method} request: {error}"


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """A request body that does not parse gets INVALID_ARGUMENT with a plain message, not grpc's UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(f"/{SERVICE_NAME}/") or handler.request_streaming:
            return handler
        deserialize = handler.request_deserializer
        name = method.rsplit("/", 1)[-1]

        def tolerant_deserialize(data: bytes):
            try:
                return deserialize(data)
            except DecodeError as exc:
                return Undecodable(name, exc)

        if handler.response_streaming:
            async def stream(request, context):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                responses = handler.unary_stream(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    await responses.aclose()  # now, so the servicer's clean-up runs before the call ends

            return _rebuild(handler, stream, tolerant_deserialize)

        async def unary(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await handler.unary_unary(request, context)

        return _rebuild(handler, unary, tolerant_deserialize)
