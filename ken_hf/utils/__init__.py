"""Small shared utilities: names confined to a folder, bounded JSON, lazy tensor
mappings, saves that replace only ken-hf's files, folders or Hub ids, fingerprints.
"""
