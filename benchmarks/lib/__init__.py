"""What more than one benchmark uses: the model and text a run measures (``setups``), where results go
(``results``), llama.cpp's tables (``llamacpp_tables``) and llm-compressor's GPTQ as a reference
(``reference_gptq``). llama.cpp itself as an instrument is ``tests.support.gguf_harness``, shared with the tests."""
