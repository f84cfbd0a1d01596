"""Placeholder until the Tinker facade lands (the lead keeps the facade helper's version)."""

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1")
