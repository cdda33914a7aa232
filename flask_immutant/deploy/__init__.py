"""Deployments: ``flask immutant deploy`` registers an app in the cluster; every node runs it."""

from __future__ import annotations

from .records import Deployment, DeploymentError

__all__ = ["Deployment", "DeploymentError"]
