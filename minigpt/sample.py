"""Writing with a trained model: continue a text (pretraining format) in a few lines of code."""
import torch


def continue_texts(model, tokenizer, prompts, max_new_tokens, temperature=0.8, top_k=50, seed=0, stop_ids=()):
    """For each prompt string, the text the model writes after it (special tokens shown as they are)."""
    gen = torch.Generator(device=model.tok_emb.weight.device).manual_seed(seed)
    ids = [tokenizer.encode(p, unknown="warn") for p in prompts]
    was_training = model.training
    model.eval()
    outs = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, stop_ids=stop_ids,
                          pad_id=tokenizer.pad_id, generator=gen)
    model.train(was_training)
    return [tokenizer.decode(o) for o in outs]
