// edgeft chat harness for Android: one app module, dependencies from Google's and Maven Central's repositories.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral() // org.pytorch:executorch-android
    }
}

rootProject.name = "edgeft-chat"
include(":app")
