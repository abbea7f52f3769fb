"""Chat templates the tests apply to the embedded tokenizer."""

# Like DeepSeek-R1-Distill's: assistant turns keep only the text after the last '</think>', and
# the generation prompt opens the think block (as its current revision does).
R1_STYLE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)
