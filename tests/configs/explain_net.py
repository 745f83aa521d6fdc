custom_imports = dict(imports=['explain_models'], allow_failed_imports=False)
model = dict(type='ExplainNet', many_unused=0)
