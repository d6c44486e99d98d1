"""The document chain with the final answer streamed as the model writes it.

Push: `truss chains push chain/doc_chain_stream.py`. Same chainlets and input as
`doc_chain.py`; the split, the map and every reduce level but the last run as there, then
the last merge call is made here with `stream: true` and its text is passed on as it comes.
The output is plain text (a chainlet streams str or bytes, not a pydantic result): callers
who need the partial results, the missing chunks, usage and timings use `doc_chain.py`.
Errors before the first byte are the same 4xx/5xx as there.
"""

import asyncio
import time
from collections.abc import AsyncIterator

import truss_chains as chains
from doc_chain import (
    RPC_OPTIONS,
    ChatModel,
    Mapper,
    Reducer,
    Splitter,
    chainlet_config,
    http_error,
    url_endpoint,
)
from doc_config import MODEL_URL, SYNC_BUDGET_S, chain_settings
from doc_llm import ChatEndpoint, new_client, stream_chat
from doc_pipeline import ChainFailure, reduce_request, split_and_map
from doc_schemas import ChainRequest, ReduceResult
from truss_chains.remote_chainlet.truss_chainlet import TrussHandle


@chains.mark_entrypoint("doc-map-reduce-stream")
class DocumentQAStream(chains.ChainletBase):
    """Summarise a document, or answer a question about it, streaming the answer."""

    # The first byte comes only after the split, the map and the reduce: the stream may be
    # silent that long (a sync request's whole budget), not truss's default 60 s.
    remote_config = chainlet_config(cpu=1, memory="2Gi",
                                    streaming_read_timeout_s=int(SYNC_BUDGET_S))

    if MODEL_URL is None:
        def __init__(self, splitter: Splitter = chains.depends(Splitter, **RPC_OPTIONS),
                     mapper: Mapper = chains.depends(Mapper, **RPC_OPTIONS),
                     reducer: Reducer = chains.depends(Reducer, **RPC_OPTIONS),
                     model: TrussHandle = chains.depends(ChatModel)) -> None:
            self._splitter, self._mapper, self._reducer = splitter, mapper, reducer
            self._endpoint = ChatEndpoint.from_handle(model, chain_settings().model_name)
    else:
        def __init__(self, splitter: Splitter = chains.depends(Splitter, **RPC_OPTIONS),
                     mapper: Mapper = chains.depends(Mapper, **RPC_OPTIONS),
                     reducer: Reducer = chains.depends(Reducer, **RPC_OPTIONS),
                     context: chains.DeploymentContext = chains.depends_context()) -> None:
            self._splitter, self._mapper, self._reducer = splitter, mapper, reducer
            self._endpoint = url_endpoint(chain_settings(), context)

    async def run_remote(self, request: ChainRequest) -> AsyncIterator[str]:
        try:
            mapped = await split_and_map(self._splitter, self._mapper, request)
            reduced: ReduceResult = await self._reducer.run_remote(reduce_request(
                mapped, request.options.map_concurrency, stop_before_final=True))
            if reduced.error is not None:
                raise ChainFailure.of(reduced.error)
        except ChainFailure as failure:
            raise http_error(failure) from None
        if reduced.final_messages is None:  # one partial answer: it is the answer
            yield reduced.answer or ""
            return
        # The last call, under what is left of the run's deadline; cancelled when it passes.
        async with new_client(1) as client, asyncio.timeout(mapped.deadline_unix - time.time()):
            async for delta in stream_chat(client, self._endpoint, reduced.final_messages,
                                           mapped.call):
                yield delta
