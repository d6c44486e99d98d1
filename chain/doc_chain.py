"""A Truss Chain that answers about (or summarises) a document far larger than the context.

    DocumentQA (entrypoint) -> Splitter   fetch by URL (our bounded fetcher) + cut into chunks
                            -> Mapper     one chat call per chunk, N at a time, with retries
                            -> Reducer    merge the answers, level by level, until one is left
    Mapper, Reducer         -> ChatModel  this repository's truss (or an existing deployment)

Push: `truss chains push chain/doc_chain.py`; try it: `chains.run_local()` (README, "Chain").
"""

import os

import fastapi
import truss_chains as chains
from doc_config import (
    API_KEY_ENV,
    ASYNC_BUDGET_S,
    DEPLOYED_TOKENIZER_DIR,
    DEPLOYED_WEIGHTS_SOURCE,
    MODEL_URL,
    MODEL_URL_ENV,
    TOKENIZER_FILES,
    ChainSettings,
    chain_settings,
)
from doc_llm import ChatEndpoint, new_client
from doc_mapreduce import map_chunks, reduce_partials
from doc_pipeline import ChainFailure, run_chain
from doc_prompts import TokenCounter
from doc_schemas import (
    ChainRequest,
    ChainResult,
    MapRequest,
    MapResult,
    ReduceRequest,
    ReduceResult,
    SplitRequest,
    SplitResult,
)
from doc_split import split_document
from truss.base.truss_config import WeightsSource
from truss_chains.public_types import MissingDependencyError
from truss_chains.remote_chainlet.truss_chainlet import TrussHandle
from truss_llm.media.parts import media_policy

# Chainlet-to-chainlet calls: one attempt (a retry would redo a whole map), and a timeout
# past the longest run, since each chainlet stops itself at the run's own deadline.
RPC_OPTIONS = {"retries": 1, "timeout_sec": ASYNC_BUDGET_S + 60}
# Runs of several callers at once: the chainlets mostly wait on the model.
PREDICT_CONCURRENCY = 16
IMAGE = chains.DockerImage(
    base_image=chains.BasetenImage.PY311,
    pip_requirements=["httpx>=0.27", "httpcore>=1.0", "pydantic>=2.7", "tokenizers>=0.20"],
    external_package_dirs=[chains.make_abs_path_here("../packages")],
)
# The chainlets that count tokens read the model's tokenizer from its weights source,
# mirrored and mounted by Baseten like the model's own weights (tokenizer files only).
TOKENIZER_ASSETS = chains.Assets(weights=[WeightsSource(
    source=DEPLOYED_WEIGHTS_SOURCE, mount_location=DEPLOYED_TOKENIZER_DIR,
    allow_patterns=TOKENIZER_FILES, auth_secret_name="hf_access_token")])
# With an existing deployment, the chainlets learn its URL from their environment.
ENVIRONMENT = {MODEL_URL_ENV: MODEL_URL} if MODEL_URL else {}
# Truss's default longest silence in a stream, in seconds.
STREAMING_READ_TIMEOUT_S = 60


def chainlet_config(cpu: int, memory: str, assets: chains.Assets | None = None,
                    streaming_read_timeout_s: int = STREAMING_READ_TIMEOUT_S
                    ) -> chains.RemoteConfig:
    options = chains.ChainletOptions(env_variables=ENVIRONMENT,
                                     streaming_read_timeout=streaming_read_timeout_s)
    return chains.RemoteConfig(
        docker_image=IMAGE, options=options, assets=assets or chains.Assets(),
        compute=chains.Compute(cpu_count=cpu, memory=memory,
                               predict_concurrency=PREDICT_CONCURRENCY))


class ChatModel(chains.TrussChainlet):
    """This repository's truss (config.yaml at the top), deployed as part of the chain."""

    truss_dir = ".."


def url_endpoint(settings: ChainSettings, context: chains.DeploymentContext) -> ChatEndpoint:
    """An existing deployment: its OpenAI base URL, with the chain's Baseten API key."""
    assert settings.model_url is not None, f"{MODEL_URL_ENV} is not set"
    api_key = settings.api_key or os.environ.get(API_KEY_ENV)
    if api_key is None:
        try:
            api_key = context.get_baseten_api_key()
        except (chains.ChainsRuntimeError, MissingDependencyError):
            api_key = None  # run_local against a runner without --api-key
    return ChatEndpoint.from_base_url(settings.model_url, api_key, settings.model_name)


class Splitter(chains.ChainletBase):
    """Fetches the document (or takes the inline text) and cuts it into chunks that fit."""

    remote_config = chainlet_config(cpu=2, memory="4Gi", assets=TOKENIZER_ASSETS)

    def __init__(self) -> None:
        self._settings = chain_settings()
        self._counter = TokenCounter(self._settings.tokenizer_file)
        # The model's media policy, from the same TRUSS_LLM_MEDIA_* variables.
        self._policy = media_policy({}, os.environ)

    async def run_remote(self, request: SplitRequest) -> SplitResult:
        return await split_document(request, self._counter, self._policy,
                                    self._settings.context_tokens)


class Mapper(chains.ChainletBase):
    """Calls the model once per chunk, a bounded number at a time."""

    remote_config = chainlet_config(cpu=1, memory="2Gi")

    if MODEL_URL is None:
        def __init__(self, model: TrussHandle = chains.depends(ChatModel),
                     context: chains.DeploymentContext = chains.depends_context()) -> None:
            self._endpoint = ChatEndpoint.from_handle(model, chain_settings().model_name)
    else:
        def __init__(self,
                     context: chains.DeploymentContext = chains.depends_context()) -> None:
            self._endpoint = url_endpoint(chain_settings(), context)

    async def run_remote(self, request: MapRequest) -> MapResult:
        async with new_client(request.concurrency) as client:
            return await map_chunks(client, self._endpoint, request)


class Reducer(chains.ChainletBase):
    """Merges partial answers, as many per call as the context holds, until one is left."""

    remote_config = chainlet_config(cpu=1, memory="2Gi", assets=TOKENIZER_ASSETS)

    if MODEL_URL is None:
        def __init__(self, model: TrussHandle = chains.depends(ChatModel),
                     context: chains.DeploymentContext = chains.depends_context()) -> None:
            settings = chain_settings()
            self._endpoint = ChatEndpoint.from_handle(model, settings.model_name)
            self._counter = TokenCounter(settings.tokenizer_file)
    else:
        def __init__(self,
                     context: chains.DeploymentContext = chains.depends_context()) -> None:
            settings = chain_settings()
            self._endpoint = url_endpoint(settings, context)
            self._counter = TokenCounter(settings.tokenizer_file)

    async def run_remote(self, request: ReduceRequest) -> ReduceResult:
        async with new_client(request.concurrency) as client:
            return await reduce_partials(client, self._endpoint, self._counter, request)


def http_error(failure: ChainFailure) -> fastapi.HTTPException:
    """How a chainlet answers with a status of its choosing: truss_chains passes an
    HTTPException's status through (any other exception becomes a 500)."""
    return fastapi.HTTPException(status_code=failure.status, detail=failure.message)


@chains.mark_entrypoint("doc-map-reduce")
class DocumentQA(chains.ChainletBase):
    """Summarise a document, or answer a question about it, whatever its length."""

    remote_config = chainlet_config(cpu=1, memory="2Gi")

    def __init__(self, splitter: Splitter = chains.depends(Splitter, **RPC_OPTIONS),
                 mapper: Mapper = chains.depends(Mapper, **RPC_OPTIONS),
                 reducer: Reducer = chains.depends(Reducer, **RPC_OPTIONS)) -> None:
        self._splitter, self._mapper, self._reducer = splitter, mapper, reducer

    async def run_remote(self, request: ChainRequest) -> ChainResult:
        try:
            return await run_chain(self._splitter, self._mapper, self._reducer, request)
        except ChainFailure as failure:
            raise http_error(failure) from None
