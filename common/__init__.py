"""Neutral pieces every package may import (it imports none of them)."""
