"""Data: loading and validating AlpacaFarm-format records, and the Alpaca prompt format."""

from prefgym.data.loading import load_records, validate_records
from prefgym.data.preferences import Preference, parse_preference, preferred_output, prob_output_2
from prefgym.data.prompts import format_prompt, format_record

__all__ = ["load_records", "validate_records", "format_prompt", "format_record", "Preference",
           "parse_preference", "prob_output_2", "preferred_output"]
