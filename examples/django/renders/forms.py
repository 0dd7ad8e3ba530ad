from __future__ import annotations

from django import forms

from renders.models import Render


class RenderForm(forms.ModelForm):
    class Meta:
        model = Render
        fields = ["prompt"]
        widgets = {"prompt": forms.TextInput(attrs={"size": 60})}
