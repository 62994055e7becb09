"""The uniopd wire contract: importable without torch, so any team can call a teacher with this package alone."""

from proto.codec import ScoredSpan
from proto.errors import ApiError
from proto.schemas import API_VERSION, JSON, MSGPACK, Fingerprint, ScoreItem, ScoreRequest, TeacherInfo

__all__ = ["API_VERSION", "JSON", "MSGPACK", "ApiError", "Fingerprint", "ScoreItem", "ScoreRequest", "ScoredSpan",
           "TeacherInfo"]
