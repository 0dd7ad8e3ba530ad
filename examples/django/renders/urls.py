from __future__ import annotations

from django.urls import path

from renders import views

urlpatterns = [
    path("", views.index, name="index"),
    path("renders/<int:pk>/", views.detail, name="render"),
    path("renders/<int:pk>/image.png", views.image, name="render-image"),
]
