"""Hub cards and publishing: model cards for a LAPA quantizer, a LAPA VLA and the converted LAPA-7B, dataset cards
for LeRobot datasets (with their latent-action labels), and `python -m hub_cards.publish` (`lapa-publish`).

    from hub_cards.publish import build_card
    built = build_card("outputs/quickstart/lapa_finetuned", "me/lapa-mt10")   # kind detected from the folder
    built.card.save("README.md")

Modules: `common` (folder kinds, records, Markdown, closed-loop results), `model_cards`, `dataset_cards`, `publish`.
"""
