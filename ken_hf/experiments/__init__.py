"""The experiment harness behind ``ken demo`` and ``ken compare``: the packaged model and
data (``assets``, ``tasks``), one fine-tune set-up (``finetune``, ``metrics``), the jobs'
settings (``run_settings``) and the jobs themselves (``demo``, ``compare``).

It sits on top of the library and imports it; nothing in the library imports it.
"""
