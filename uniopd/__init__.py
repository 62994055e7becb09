"""uniopd: teacher-as-a-service on-policy distillation. The CLI lives in uniopd.cli."""
