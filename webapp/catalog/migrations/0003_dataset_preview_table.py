"""Previews move to a table of their own (no list loads them), clipped as uploads now keep them: a preview
stored before could hold whole cells of any size."""

import django.db.models.deletion
from django.db import migrations, models

from workers.data.datasets import PREVIEW_ROWS, preview_of


def move_previews(apps, schema_editor):
    Dataset = apps.get_model("catalog", "Dataset")
    DatasetPreview = apps.get_model("catalog", "DatasetPreview")
    for pk in Dataset.objects.values_list("pk", flat=True).iterator():
        rows = Dataset.objects.filter(pk=pk).values_list("preview", flat=True).get() or []  # one at a time
        clipped = [preview_of(row) for row in rows[:PREVIEW_ROWS] if isinstance(row, dict)]
        DatasetPreview.objects.create(dataset_id=pk, rows=clipped)


def move_previews_back(apps, schema_editor):
    Dataset = apps.get_model("catalog", "Dataset")
    DatasetPreview = apps.get_model("catalog", "DatasetPreview")
    for preview in DatasetPreview.objects.iterator():
        Dataset.objects.filter(pk=preview.dataset_id).update(preview=preview.rows)


class Migration(migrations.Migration):

    dependencies = [
        ('catalog', '0002_loraconfig_params'),
    ]

    operations = [
        migrations.CreateModel(
            name='DatasetPreview',
            fields=[
                ('dataset', models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, primary_key=True, related_name='+', serialize=False, to='catalog.dataset')),
                ('rows', models.JSONField(blank=True, default=list)),
            ],
        ),
        migrations.RunPython(move_previews, move_previews_back),
        migrations.RemoveField(
            model_name='dataset',
            name='preview',
        ),
    ]
