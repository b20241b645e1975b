"""Helpers shared by the test modules: tiny model configs, references and prompts, the shared
local Ray (`common`); a Serve app in-process, steady load and the actor census (`serving`)."""
