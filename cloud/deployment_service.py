"""The ``deployments`` RPC service: roll a registered model out to devices stage by stage, watch
it, pause, resume or roll it back -- and the devices' reports on what they installed.  Thin over
``cloud.deployments``, which validates and decides."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from fedmq.broker.roles import DEVICES, OPERATOR, READERS, STEERING
from fedmq.broker.rpc_server import CallContext, rpc
from fedmq.cloud.deployments import ACTIVE, COMPLETED, ROLLED_BACK, Deployments, InvalidDeployment, deployment_view
from fedmq.cloud.pages import DEFAULT_LIMIT, MAX_LIMIT, Page, page

ModelName = Annotated[str, Field(min_length=1, max_length=128)]
Version = Annotated[int, Field(ge=1)]
Text = Annotated[str, Field(max_length=4000)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT)]
DeploymentId = Annotated[str, Field(min_length=1, max_length=128)]
STATES = (*ACTIVE, COMPLETED, ROLLED_BACK)


class DeploymentService:
    name = "deployments"

    def __init__(self, deployments: Deployments) -> None:
        self.deployments = deployments

    @rpc(roles=OPERATOR)
    def create(self, ctx: CallContext, name: ModelName, version: Version, to: Text = "",
               stages: Annotated[list[float], Field(min_length=1, max_length=20)] | None = None,
               max_failure_rate: Fraction = 0.0, health: Text = "",
               stage_timeout_s: Annotated[float, Field(ge=1, le=7 * 24 * 3600)] = 600.0,
               signature: Annotated[str, Field(max_length=256)] | None = None,
               key_id: Annotated[str, Field(max_length=32)] | None = None,
               deployment: DeploymentId | None = None) -> dict[str, Any]:
        """Deploy NAME:VERSION to the devices ``to`` selects, in cumulative ``stages`` (fractions
        ending at 1.0), each judged by ``health`` over what the devices report; a stage with more
        than ``max_failure_rate`` failing rolls the deployment back.  ``signature``/``key_id``:
        the operator's Ed25519 signature over ``model_signing_message(name, version, sha256)``."""
        row = self.deployments.create(name=name, version=version, to=to, stages=stages or [1.0],
                                      max_failure_rate=max_failure_rate, health=health,
                                      stage_timeout_s=stage_timeout_s, signature=signature, key_id=key_id,
                                      by=ctx.caller, deployment_id=deployment)
        return self.deployments.get(row.id)

    @rpc(name="list", roles=READERS)
    def list_(self, state: str | None = None, name: ModelName | None = None, limit: Limit = DEFAULT_LIMIT,
              cursor: str | None = None) -> Page:
        """Deployments, newest first, optionally of one state or model name: a page of them."""
        if state is not None and state not in STATES:
            raise InvalidDeployment(f"state must be one of {', '.join(STATES)}")
        return page(self.deployments.query(state, name), limit, cursor, deployment_view)

    @rpc(roles=READERS)
    def get(self, deployment: DeploymentId) -> dict[str, Any]:
        """One deployment: its state, its devices (stage, state, metrics, reason) and its
        decisions in order, each with its reason."""
        return self.deployments.get(deployment)

    @rpc(roles=STEERING)
    def pause(self, ctx: CallContext, deployment: DeploymentId) -> dict[str, Any]:
        """Stop advancing (reports are still recorded)."""
        return deployment_view(self.deployments.pause(deployment, by=ctx.caller))

    @rpc(roles=STEERING)
    def resume(self, ctx: CallContext, deployment: DeploymentId) -> dict[str, Any]:
        """Advance again; the stage's timeout counts from now."""
        return deployment_view(self.deployments.resume(deployment, by=ctx.caller))

    @rpc(roles=STEERING)
    def rollback(self, ctx: CallContext, deployment: DeploymentId, reason: Text = "") -> dict[str, Any]:
        """Every device that took the version gets back the one it had (running, paused or completed)."""
        return deployment_view(self.deployments.rollback(deployment, by=ctx.caller, reason=reason))

    @rpc(roles=DEVICES)
    def report(self, ctx: CallContext, deployment: DeploymentId, name: ModelName, version: Version, ok: bool,
               metrics: dict[str, Any] | None = None,
               error: Annotated[str, Field(max_length=4000)] | None = None) -> dict[str, Any]:
        """A device, about the version its record asked for: installed and healthy or not
        (``metrics`` from its [deploy] entry point), or why the install failed.  The device is
        the caller; it speaks only for itself."""
        return self.deployments.report(ctx.caller, deployment, name, version, ok, metrics, error)
