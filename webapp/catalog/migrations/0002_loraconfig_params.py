"""LoraConfig keeps its adapter as one `params` JSON object (a whole LoraParams) instead of a column per field."""

from django.db import migrations, models

# The columns of 0001, all of which were LoraParams fields of the same name.
OLD_COLUMNS = ("r", "alpha", "dropout", "target_modules", "bias", "quantization", "quant_type", "double_quant", "compute_dtype")


def columns_to_params(apps, schema_editor):
    LoraConfig = apps.get_model("catalog", "LoraConfig")
    for config in LoraConfig.objects.all():
        config.params = {"method": config.method or "lora", **{name: getattr(config, name) for name in OLD_COLUMNS}}
        config.save(update_fields=["params"])


def params_to_columns(apps, schema_editor):
    LoraConfig = apps.get_model("catalog", "LoraConfig")
    for config in LoraConfig.objects.all():
        for name in OLD_COLUMNS:
            if name in config.params:
                setattr(config, name, config.params[name])
        config.save(update_fields=list(OLD_COLUMNS))


class Migration(migrations.Migration):

    dependencies = [
        ('catalog', '0001_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='loraconfig',
            name='params',
            field=models.JSONField(blank=True, default=dict, help_text="The adapter's LoraParams, field by field."),
        ),
        migrations.RunPython(columns_to_params, params_to_columns),
        migrations.RemoveField(
            model_name='loraconfig',
            name='alpha',
        ),
        migrations.RemoveField(
            model_name='loraconfig',
            name='bias',
        ),
        migrations.RemoveField(
            model_name='loraconfig',
            name='compute_dtype',
        ),
        migrations.RemoveField(
            model_name='loraconfig',
            name='double_quant',
        ),
        migrations.RemoveField(
            model_name='loraconfig',
            name='dropout',
        ),
        migrations.RemoveField(
            model_name='loraconfig',
            name='quant_type',
        ),
        migrations.RemoveField(
            model_name='loraconfig',
            name='quantization',
        ),
        migrations.RemoveField(
            model_name='loraconfig',
            name='r',
        ),
        migrations.RemoveField(
            model_name='loraconfig',
            name='target_modules',
        ),
        migrations.AlterField(
            model_name='loraconfig',
            name='method',
            field=models.CharField(choices=[('lora', 'LoRA'), ('ia3', 'IA3'), ('prefix_tuning', 'Prefix tuning'), ('prompt_tuning', 'Prompt tuning')], default='lora', editable=False, max_length=16),
        ),
    ]
