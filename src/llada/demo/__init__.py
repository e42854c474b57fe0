"""`llada demo`: a web page that shows LLaDA's denoising live (Gradio, an optional extra).

`constraints` and `render` are plain Python; `session` runs one turn through the sampling loop;
`app` builds the Gradio page and imports gradio only when it does.
"""
