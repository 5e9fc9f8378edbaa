"""Instruction records, their loaders, the prompt template and client partitioners."""
from mira.data.records import SOURCES, Record, load_records
from mira.data.partition import PARTITIONERS, ClientData, partition
from mira.data.prompts import TokenizedDataset, collate, format_prompt, tokenize_records

__all__ = ["SOURCES", "PARTITIONERS", "Record", "ClientData", "TokenizedDataset", "collate", "format_prompt",
           "load_records", "partition", "tokenize_records"]
